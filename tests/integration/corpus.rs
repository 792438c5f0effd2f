//! The bad-input corpus (`tests/corpus/bad_input/*.resp`, also the seed
//! corpus of the fuzz targets): every input is answered with an error or a
//! close, kiln goes on, and the next client is served.

use std::time::Duration;

use crate::util::*;

/// Reads replies until an error reply or the close; `None` if neither came.
async fn error_or_close(c: &mut Conn) -> Option<String> {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        match c.try_read_within(left).await {
            Err(()) => return None,
            Ok(None) => return Some("closed".into()),
            Ok(Some(r)) if r.starts_with(b"-") => {
                return Some(String::from_utf8_lossy(&r).trim_end().to_string());
            }
            Ok(Some(_)) => {}
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_corpus_input_gets_an_error_or_a_close() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/corpus/bad_input");
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .expect("corpus dir")
        .map(|e| e.expect("entry").path())
        .collect();
    files.sort();
    assert!(files.len() >= 50, "{} inputs", files.len());
    let (_redis, kiln) = redis_and_kiln_with(|c| {
        c.server.idle_timeout = Duration::ZERO;
    })
    .await;
    let mut bystander = kiln.conn().await;
    assert_eq!(bystander.cmd(&["SET", "alive", "1"]).await, "+OK\r\n");
    for path in &files {
        let input = std::fs::read(path).expect("read input");
        let mut c = kiln.conn().await;
        // kiln may close before taking it all: that is an answer too.
        let _ = tokio::io::AsyncWriteExt::write_all(&mut c.stream, &input).await;
        let answer = error_or_close(&mut c).await;
        assert!(
            answer.is_some(),
            "{}: neither an error nor a close",
            path.display()
        );
        assert_eq!(
            bystander.cmd(&["GET", "alive"]).await,
            "$1\r\n1\r\n",
            "after {}",
            path.display()
        );
    }
    // A new client after all of it.
    assert_eq!(kiln.conn().await.cmd(&["PING"]).await, "+PONG\r\n");
}
