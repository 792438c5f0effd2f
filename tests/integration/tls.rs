//! TLS: clients to kiln (`[server.tls]`) and kiln to a `rediss://` upstream
//! (a real redis-server with its TLS port), with certificates made here by
//! rcgen. A plaintext client on the TLS port is closed without a reply.

use std::path::PathBuf;
use std::sync::Arc;

use kiln::config::ServerTlsConfig;
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::util::*;

/// A CA and a certificate for 127.0.0.1/localhost it signed, as PEM files.
pub struct Certs {
    dir: PathBuf,
    ca_der: CertificateDer<'static>,
}

impl Certs {
    pub fn make(name: &str) -> Certs {
        let dir = std::env::temp_dir().join(format!("kiln-tls-{}-{name}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let ca_key = rcgen::KeyPair::generate().expect("key");
        let mut ca = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
        ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        ca.distinguished_name
            .push(rcgen::DnType::CommonName, "kiln test CA");
        let ca_cert = ca.self_signed(&ca_key).expect("ca");
        let key = rcgen::KeyPair::generate().expect("key");
        let params = rcgen::CertificateParams::new(vec!["localhost".into(), "127.0.0.1".into()])
            .expect("params");
        let cert = params.signed_by(&key, &ca_cert, &ca_key).expect("cert");
        std::fs::write(dir.join("ca.pem"), ca_cert.pem()).expect("write");
        std::fs::write(dir.join("cert.pem"), cert.pem()).expect("write");
        std::fs::write(dir.join("key.pem"), key.serialize_pem()).expect("write");
        Certs {
            ca_der: ca_cert.der().clone(),
            dir,
        }
    }

    pub fn path(&self, f: &str) -> String {
        self.dir.join(f).display().to_string()
    }

    fn server(&self) -> ServerTlsConfig {
        ServerTlsConfig {
            cert: self.path("cert.pem"),
            key: self.path("key.pem"),
        }
    }

    pub fn client(&self) -> tokio_rustls::TlsConnector {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(self.ca_der.clone()).expect("ca");
        let cfg = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
        tokio_rustls::TlsConnector::from(Arc::new(cfg))
    }
}

impl Drop for Certs {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("port")
}

/// A redis-server with a TLS port besides its plain one.
fn tls_redis(certs: &Certs) -> (Redis, u16) {
    let port = free_port();
    let p = port.to_string();
    let (cert, key, ca) = (
        certs.path("cert.pem"),
        certs.path("key.pem"),
        certs.path("ca.pem"),
    );
    let redis = Redis::start_with(&[
        "--tls-port",
        &p,
        "--tls-cert-file",
        &cert,
        "--tls-key-file",
        &key,
        "--tls-ca-cert-file",
        &ca,
        "--tls-auth-clients",
        "no",
    ]);
    (redis, port)
}

/// Sends `cmd` on a TLS stream and reads one reply: all that came.
async fn tls_cmd<S: AsyncReadExt + AsyncWriteExt + Unpin>(s: &mut S, args: &[&str]) -> String {
    let got = crate::util::stream_cmd(s, args).await;
    assert_eq!(crate::util::frame_len(&got), Some(got.len()), "one reply");
    String::from_utf8_lossy(&got).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_clients_and_a_rediss_upstream() {
    let certs = Certs::make("roundtrip");
    let (redis, tls_port) = tls_redis(&certs);
    let kiln = Kiln::start_tls(
        &format!("rediss://127.0.0.1:{tls_port}"),
        certs.server(),
        |c| c.upstream.tls_ca = Some(certs.path("ca.pem")),
    )
    .await;
    let connect = || async {
        let tcp = TcpStream::connect(kiln.addr).await.expect("connect");
        certs
            .client()
            .connect(ServerName::try_from("localhost").expect("name"), tcp)
            .await
            .expect("TLS handshake with kiln")
    };
    let mut c = connect().await;
    assert_eq!(tls_cmd(&mut c, &["PING"]).await, "+PONG\r\n");
    assert_eq!(tls_cmd(&mut c, &["SET", "k", "over tls"]).await, "+OK\r\n");
    assert_eq!(tls_cmd(&mut c, &["GET", "k"]).await, "$8\r\nover tls\r\n");
    // It went through the TLS upstream to the real server.
    assert_eq!(redis.conn().await.cmd_text(&["GET", "k"]).await, "over tls");
    // The second GET is an L1 hit; a direct write is still seen (tracking
    // over TLS).
    assert_eq!(tls_cmd(&mut c, &["GET", "k"]).await, "$8\r\nover tls\r\n");
    redis.conn().await.cmd(&["SET", "k", "changed"]).await;
    let deadline = std::time::Instant::now() + WAIT;
    while tls_cmd(&mut c, &["GET", "k"]).await != "$7\r\nchanged\r\n" {
        assert!(
            std::time::Instant::now() < deadline,
            "invalidation never came"
        );
    }
    // A large value crosses many TLS records both ways.
    let big = "x".repeat(300_000);
    assert_eq!(tls_cmd(&mut c, &["SET", "big", &big]).await, "+OK\r\n");
    let reply = tls_cmd(&mut c, &["GET", "big"]).await;
    assert_eq!(reply.len(), big.len() + 11);

    // A plaintext client on the TLS port gets no reply and is closed; kiln
    // and its TLS clients go on.
    let mut plain = TcpStream::connect(kiln.addr).await.expect("connect");
    plain.write_all(b"PING\r\n").await.expect("write");
    let mut buf = Vec::new();
    let read = tokio::time::timeout(WAIT, plain.read_to_end(&mut buf))
        .await
        .expect("closed in time");
    assert!(
        read.is_err() || !String::from_utf8_lossy(&buf).contains("PONG"),
        "{buf:?}"
    );
    let mut again = connect().await;
    assert_eq!(
        tls_cmd(&mut again, &["GET", "k"]).await,
        "$7\r\nchanged\r\n"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_certificate_kiln_does_not_trust_is_refused() {
    let certs = Certs::make("untrusted");
    let other = Certs::make("other-ca");
    let (_redis, tls_port) = tls_redis(&certs);
    let kiln = Kiln::start_with_url(&format!("rediss://127.0.0.1:{tls_port}"), |c| {
        c.upstream.tls_ca = Some(other.path("ca.pem"));
    })
    .await;
    let mut c = kiln.conn().await;
    let r = c.cmd(&["SET", "k", "v"]).await;
    let text = String::from_utf8_lossy(&r);
    assert!(
        text.starts_with("-ERR upstream: connect to") && text.contains("TLS"),
        "{text}"
    );
}

/// With no system root certificates (an image without ca-certificates,
/// here an unreadable store) and no `upstream.tls_ca`, a `rediss://`
/// upstream is a config error naming `upstream.url` and why (check-config
/// and start alike), instead of a start that fails every connect with an
/// unknown issuer; with `upstream.tls_ca` the same config is valid.
#[test]
fn a_rediss_upstream_with_nothing_to_verify_it_is_a_config_error() {
    let certs = Certs::make("no-roots");
    let check = |text: &str| {
        let config = crate::util::process::temp_config("no-roots", text);
        let out = crate::util::process::kiln_bin()
            .env("SSL_CERT_FILE", "/nonexistent")
            .env("SSL_CERT_DIR", "/nonexistent")
            .args(["check-config", "--config", &config.to_string_lossy()])
            .output()
            .expect("run kiln");
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (code, err) = check("[upstream]\nurl = \"rediss://127.0.0.1:1\"\n");
    assert_ne!(code, Some(0), "{err}");
    assert!(
        err.contains("`upstream.url`")
            && err.contains("no root certificate to verify upstream with")
            && err.contains("install ca-certificates"),
        "{err}"
    );
    let (code, err) = check(&format!(
        "[upstream]\nurl = \"rediss://127.0.0.1:1\"\ntls_ca = \"{}\"\n",
        certs.path("ca.pem")
    ));
    assert_eq!(code, Some(0), "{err}");
}
