//! TLS with rustls (the `ring` provider, chosen per config rather than
//! installed process-wide): the client-facing listener (`[server.tls]`) and
//! `rediss://` upstreams (`upstream.tls_ca` on top of the system's roots).
//!
//! `Stream` is a connection that is plain TCP or TLS; both split into halves
//! that the connection loops use as `AsyncRead`/`AsyncWrite`.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn certs(path: &str) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs: Vec<_> = CertificateDer::pem_file_iter(path)
        .map_err(|e| format!("cannot read certificates from `{path}`: {e}"))?
        .collect::<Result<_, _>>()
        .map_err(|e| format!("bad certificate in `{path}`: {e}"))?;
    if certs.is_empty() {
        return Err(format!("no PEM certificate in `{path}`"));
    }
    Ok(certs)
}

/// Why `[server.tls]` cannot be used, and which of its keys is at fault.
#[derive(Debug)]
pub struct ServerTlsError {
    /// `"cert"` or `"key"`.
    pub key: &'static str,
    pub message: String,
}

impl std::fmt::Display for ServerTlsError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "server.tls.{}: {}", self.key, self.message)
    }
}

/// The client-facing TLS settings (`[server.tls]`): `cert_path` a PEM
/// certificate chain, `key_path` a PEM private key (PKCS#8, PKCS#1 or
/// SEC1), loaded and checked to go together.
pub fn acceptor(
    cert_path: &str,
    key_path: &str,
) -> Result<tokio_rustls::TlsAcceptor, ServerTlsError> {
    let at = |key: &'static str| move |message: String| ServerTlsError { key, message };
    let chain = certs(cert_path).map_err(at("cert"))?;
    let key = PrivateKeyDer::from_pem_file(key_path)
        .map_err(|e| format!("cannot read a private key from `{key_path}`: {e}"))
        .map_err(at("key"))?;
    let config = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())
        .map_err(at("cert"))?
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .map_err(|e| format!("the certificate and the key do not go together: {e}"))
        .map_err(at("key"))?;
    Ok(tokio_rustls::TlsAcceptor::from(Arc::new(config)))
}

/// The system's root certificates, read once (the first `rediss://`
/// connector or config check) and logged: how many were loaded, and why
/// the store could not be read if it could not (a container image without
/// `ca-certificates`).
fn system_roots() -> &'static rustls::RootCertStore {
    static ROOTS: std::sync::OnceLock<rustls::RootCertStore> = std::sync::OnceLock::new();
    ROOTS.get_or_init(|| {
        let found = rustls_native_certs::load_native_certs();
        let mut roots = rustls::RootCertStore::empty();
        // A system certificate rustls cannot use is skipped, as browsers do.
        let (added, skipped) = roots.add_parsable_certificates(found.certs);
        let errors: Vec<String> = found.errors.iter().map(|e| e.to_string()).collect();
        if added == 0 {
            tracing::warn!(
                ?errors,
                "no system root certificates: a rediss:// upstream needs upstream.tls_ca (or the system's ca-certificates)"
            );
        } else {
            tracing::info!(roots = added, skipped, ?errors, "system root certificates loaded");
        }
        roots
    })
}

/// How kiln verifies a `rediss://` upstream: the system's roots plus
/// `ca` (a PEM file), if given. `Err` when that leaves nothing to verify
/// a certificate against.
pub fn connector(ca: Option<&str>) -> Result<tokio_rustls::TlsConnector, String> {
    let mut roots = system_roots().clone();
    if let Some(path) = ca {
        for cert in certs(path)? {
            roots
                .add(cert)
                .map_err(|e| format!("bad CA certificate in `{path}`: {e}"))?;
        }
    }
    if roots.is_empty() {
        return Err("no root certificate to verify upstream with: the system store is empty or unreadable (install ca-certificates) and upstream.tls_ca is not set".into());
    }
    let config = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(tokio_rustls::TlsConnector::from(Arc::new(config)))
}

/// The name a `rediss://` upstream's certificate must carry: its host.
pub fn server_name(host: &str) -> Result<ServerName<'static>, String> {
    ServerName::try_from(host.to_string())
        .map_err(|_| format!("`{host}` is not a valid TLS server name"))
}

/// A plain or TLS connection.
pub enum Stream {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
}

pub type BoxRead = Box<dyn AsyncRead + Send + Unpin>;
pub type BoxWrite = Box<dyn AsyncWrite + Send + Unpin>;

impl Stream {
    /// Read and write halves that can be used from different places; a
    /// plain socket splits without a lock.
    pub fn split(self) -> (BoxRead, BoxWrite) {
        match self {
            Stream::Plain(s) => {
                let (r, w) = s.into_split();
                (Box::new(r), Box::new(w))
            }
            Stream::Tls(s) => {
                let (r, w) = tokio::io::split(*s);
                (Box::new(r), Box::new(w))
            }
        }
    }
}

impl AsyncRead for Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_flush(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}
