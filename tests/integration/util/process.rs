//! Child processes for tests: the kiln binary in front of a test's Redis
//! (killed by PID on drop), other tools run to completion, and scratch
//! directories of their own per test.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};

use super::{Redis, free_port, wait_listening};

/// The kiln binary this test run built.
pub fn kiln_bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_kiln"))
}

/// A new, empty-or-reused directory `kiln-<kind>-<pid>-<n>` under the
/// system's temp dir, `n` counting the calls in this process: a test's
/// own, never another's.
pub fn scratch_dir(kind: &str) -> PathBuf {
    static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let dir = std::env::temp_dir().join(format!("kiln-{kind}-{}-{n}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("scratch dir");
    dir
}

/// Writes `text` to `kiln.toml` in a directory named after `name`.
pub fn temp_config(name: &str, text: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("kiln-test-{}-{name}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let path = dir.join("kiln.toml");
    std::fs::write(&path, text).expect("write config");
    path
}

/// Runs `cmd` to completion and asserts it succeeded (`what` names it in
/// the failure, with its output); `missing` is the panic when it cannot run.
pub fn run_ok(cmd: &mut Command, what: &str, missing: &str) -> Output {
    let out = cmd.output().expect(missing);
    assert!(
        out.status.success(),
        "{what}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// The kiln binary serving on a free port in front of a test's Redis
/// (`--listen`, `--upstream`, `--metrics 127.0.0.1:0`), its output
/// discarded; killed by PID on drop.
pub struct KilnProcess {
    pub child: Child,
    pub addr: SocketAddr,
}

impl KilnProcess {
    /// Started, and accepting connections.
    pub async fn start(redis: &Redis) -> KilnProcess {
        let listen = format!("127.0.0.1:{}", free_port());
        Self::spawn(
            kiln_bin()
                .args([
                    "--listen",
                    &listen,
                    "--upstream",
                    &redis.url(),
                    "--metrics",
                    "127.0.0.1:0",
                ])
                .env("RUST_LOG", "warn")
                .stdout(Stdio::null())
                .stderr(Stdio::null()),
            listen.parse().expect("addr"),
        )
        .await
    }

    /// `cmd` (a `kiln_bin()` with its arguments) spawned, once it accepts
    /// connections at `addr`.
    pub async fn spawn(cmd: &mut Command, addr: SocketAddr) -> KilnProcess {
        let child = cmd.spawn().expect("spawn kiln");
        // Killed on drop should it never listen.
        let p = KilnProcess { child, addr };
        wait_listening(addr, "kiln").await;
        p
    }

    /// Sends `signal` (`-TERM`, `-HUP` ...) to the process.
    pub fn signal(&self, signal: &str) {
        let status = Command::new("kill")
            .args([signal, &self.child.id().to_string()])
            .status()
            .expect("kill");
        assert!(status.success());
    }
}

impl Drop for KilnProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
