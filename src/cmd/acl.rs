//! Clients logged in as an upstream ACL user (no kiln users configured:
//! `AUTH` and `HELLO ... AUTH` are checked by upstream). Their commands run
//! on connections of that user, so upstream's ACL decides everything it
//! sees. What upstream does not see is an L1 hit: L1 serves such a client a
//! key only once upstream said that user may run that read on that key
//! (`ACL DRYRUN user GET key`, Redis 7.0), remembered here. Until then, and
//! whenever it said no, the read goes upstream as that user and gets
//! upstream's own answer, `-NOPERM` included.
//!
//! What upstream said is forgotten when ACLs may have changed: an `ACL`
//! command through kiln, or a change of upstream's `ACL SETUSER|DELUSER|
//! LOAD` call counts, which the coherence check reads every
//! `coherence.check_interval` (a change made directly upstream is therefore
//! seen within that interval).

use std::sync::atomic::Ordering;

use bytes::Bytes;

use crate::context::Context;
use crate::protocol::request::encode_command;
use crate::upstream::Creds;

/// The current ACL generation: bumped by the coherence check when upstream's
/// ACLs changed, and by kiln when an `ACL` command went through it.
pub fn generation(ctx: &Context) -> u64 {
    ctx.coherence.acl_changes.load(Ordering::Relaxed)
}

/// Commands kiln answers itself (so upstream never sees them) that
/// upstream's ACL may deny: checked with `ACL DRYRUN` for a client logged
/// in as an upstream user, as `name` or `name|sub`.
pub fn answered_by_kiln(name: &[u8], args: &[Bytes]) -> Option<String> {
    match name {
        b"ping" | b"echo" | b"select" => Some(String::from_utf8_lossy(name).into_owned()),
        b"client" => {
            let sub = args.get(1)?.to_ascii_lowercase();
            let local = super::clients::ABOUT_SELF;
            (local.contains(&&sub[..]) || sub == b"kill")
                .then(|| format!("client|{}", String::from_utf8_lossy(&sub)))
        }
        _ => None,
    }
}

/// Whether `who` may run a command kiln answers itself (`shown`, from
/// `answered_by_kiln`); the `-NOPERM` error Redis gives if not. Asked of
/// upstream once per (user, command) and remembered like key answers.
pub async fn permit_local(
    ctx: &Context,
    who: &Creds,
    shown: &str,
    args: &[Bytes],
) -> Result<(), String> {
    let generation = generation(ctx);
    let key = Bytes::from(shown.to_string());
    let allowed = match ctx.acl.allowed(generation, who, "", &key) {
        Some(a) => a,
        None => {
            let mut ask: Vec<&[u8]> = vec![b"ACL", b"DRYRUN", who.user.as_bytes()];
            ask.extend(args.iter().map(|a| &a[..]));
            let reply = ctx.control.send(encode_command(&ask), None, true).await;
            // An error (a command upstream does not know) is left to kiln's
            // own handling; only a stated refusal refuses.
            let allowed = match reply {
                Ok(Ok(r)) => r.starts_with(b"+") || r.starts_with(b"-"),
                _ => true,
            };
            ctx.acl.learned(generation, &who.user, "", key, allowed);
            allowed
        }
    };
    if allowed {
        Ok(())
    } else {
        Err(format!(
            "NOPERM this user has no permissions to run the '{shown}' command"
        ))
    }
}

/// Asks upstream, in the background, whether `who` may run `cmd key`, and
/// remembers the answer. The reply is `+OK` when allowed; anything else (a
/// reason, an error such as kiln's own user lacking `ACL DRYRUN`) counts
/// as not allowed.
///
/// `rest` are the call's arguments after the key: `ACL DRYRUN` checks the
/// command's arity, so `HGET key` alone would be refused. The answer is
/// kept by (command, key) only: ACLs grant by command and key pattern, not
/// by the other arguments.
pub fn learn(
    ctx: &std::sync::Arc<Context>,
    who: &Creds,
    cmd: &'static str,
    key: &Bytes,
    rest: &[Bytes],
) {
    let generation = generation(ctx);
    let mut args: Vec<&[u8]> = vec![b"ACL", b"DRYRUN", who.user.as_bytes(), cmd.as_bytes(), key];
    args.extend(rest.iter().map(|a| &a[..]));
    let ask = encode_command(&args);
    let rx = ctx.control.send(ask, None, true);
    let (ctx, user, key) = (ctx.clone(), who.user.clone(), key.clone());
    tokio::spawn(async move {
        if let Ok(Ok(reply)) = rx.await {
            let allowed = &reply[..] == b"+OK\r\n";
            ctx.acl.learned(generation, &user, cmd, key, allowed);
        }
    });
}
