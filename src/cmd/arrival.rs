//! A fill read's arrival: where a read sent on a tracking reader notes, as
//! its reply arrives, the connection it came on and each key's
//! tracking-push generation, so its fill is fenced only by pushes that came
//! after it (`FillToken::arrived`). Used by GET, MGET and the other cached
//! reads.

use std::sync::Arc;

use bytes::Bytes;

use crate::cache::FillToken;
use crate::context::Context;
use crate::upstream::OnReply;

/// Where a fill read on a tracking reader notes, as its reply arrives, the
/// tracking-push generation of each key it reads (see
/// `FillToken::arrived`). Inert outside `coherence.mode = "tracking"`.
#[derive(Clone, Default)]
pub(super) struct Arrival(Option<Arc<std::sync::OnceLock<Noted>>>);

/// What a fill read's reply noted on arrival: the connection it came on
/// (`upstream::stream`) and each key's tracking-push generation.
type Noted = (u32, Vec<u64>);

impl Arrival {
    /// The hook to send the read with, and where it notes.
    pub(super) fn hook(ctx: &Arc<Context>, keys: Vec<Bytes>) -> (Arrival, Option<OnReply>) {
        if ctx.coherence.mode != crate::config::CoherenceMode::Tracking {
            return (Arrival(None), None);
        }
        let cell = Arc::new(std::sync::OnceLock::new());
        let (noted, ctx) = (cell.clone(), ctx.clone());
        let hook: OnReply = Box::new(move || {
            let stream = crate::upstream::stream::replying_stream();
            let _ = noted.set((
                stream,
                keys.iter().map(|k| ctx.l1.push_generation(k)).collect(),
            ));
        });
        (Arrival(Some(cell)), Some(hook))
    }

    /// `t` for the `i`th key, rebased on what was noted, with the
    /// connection the reply came on (unchanged if the reply never came).
    pub(super) fn token(&self, i: usize, t: FillToken) -> FillToken {
        let noted = self.0.as_ref().and_then(|c| c.get());
        match noted.and_then(|(stream, v)| Some((*stream, *v.get(i)?))) {
            Some((stream, push)) => t.arrived(push, stream),
            None => t,
        }
    }
}
