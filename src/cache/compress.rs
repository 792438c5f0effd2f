//! Entry compression (`cache.compression`): LZ4 or zstd for values past
//! `min_size` that shrink, with one zstd context per thread.

/// The flags of a compressed entry's value, in its length word.
pub(super) const LZ4: u16 = 1 << 15;
pub(super) const ZSTD: u16 = 1 << 14;

thread_local! {
    /// zstd contexts, one per thread: making one per value cost more than
    /// the (de)compression of a 4 KiB value itself.
    static ZSTD_IN: std::cell::RefCell<Option<zstd::bulk::Decompressor<'static>>> =
        const { std::cell::RefCell::new(None) };
    static ZSTD_OUT: std::cell::RefCell<Option<zstd::bulk::Compressor<'static>>> =
        const { std::cell::RefCell::new(None) };
}

/// How an entry's value bytes are stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    None,
    /// `lz4_flex` block format, the original length first (4 bytes LE).
    Lz4,
    /// zstd frame, level 3, the original length first (4 bytes LE).
    Zstd,
}

impl Compression {
    pub(super) fn flag(self) -> u16 {
        match self {
            Compression::None => 0,
            Compression::Lz4 => LZ4,
            Compression::Zstd => ZSTD,
        }
    }

    /// `data` compressed with the original length first, or `None` when
    /// that would not be smaller.
    pub(super) fn compress(self, data: &[u8]) -> Option<Vec<u8>> {
        let body = match self {
            Compression::None => return None,
            Compression::Lz4 => lz4_flex::block::compress(data),
            Compression::Zstd => zstd_compress(data)?,
        };
        if body.len() + 4 >= data.len() {
            return None;
        }
        let mut out = Vec::with_capacity(body.len() + 4);
        out.extend_from_slice(&(data.len() as u32).to_le_bytes());
        out.extend_from_slice(&body);
        Some(out)
    }
}

/// zstd level 3 (the library's default) with this thread's context.
pub(super) fn zstd_compress(data: &[u8]) -> Option<Vec<u8>> {
    ZSTD_OUT.with(|z| {
        let mut z = z.borrow_mut();
        if z.is_none() {
            *z = zstd::bulk::Compressor::new(3).ok();
        }
        z.as_mut()?.compress(data).ok()
    })
}

/// Decompresses `stored` (the original length first, then the body) into
/// `out`, which is exactly the original length.
pub(super) fn decompress_into(c: Compression, stored: &[u8], out: &mut [u8]) -> Result<(), String> {
    let body = stored.get(4..).unwrap_or_default();
    let n = match c {
        Compression::None => {
            out.copy_from_slice(body.get(..out.len()).ok_or("short value")?);
            out.len()
        }
        Compression::Lz4 => {
            lz4_flex::block::decompress_into(body, out).map_err(|e| e.to_string())?
        }
        Compression::Zstd => ZSTD_IN.with(|z| {
            let mut z = z.borrow_mut();
            if z.is_none() {
                *z = Some(zstd::bulk::Decompressor::new().map_err(|e| e.to_string())?);
            }
            match z.as_mut() {
                Some(d) => d.decompress_to_buffer(body, out).map_err(|e| e.to_string()),
                None => Err("no zstd context".to_string()),
            }
        })?,
    };
    if n != out.len() {
        return Err(format!("{n} bytes where {} were stored", out.len()));
    }
    Ok(())
}

/// The original bytes of a compressed value (empty if they are corrupt,
/// which only a bug could make: kiln wrote them).
pub(super) fn decompress(c: Compression, stored: &[u8]) -> Vec<u8> {
    let len = stored
        .first_chunk::<4>()
        .map_or(0, |l| u32::from_le_bytes(*l) as usize);
    let mut out = vec![0; len];
    match decompress_into(c, stored, &mut out) {
        Ok(()) => out,
        Err(e) => {
            tracing::error!(error = %e, "L1 entry failed to decompress");
            Vec::new()
        }
    }
}
