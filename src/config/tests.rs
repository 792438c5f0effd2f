use super::*;

#[test]
fn parse_errors_do_not_quote_secrets() {
    for text in [
        "[server]\nrequirepass = \"Sup3rSecret",
        "[[users]]\nname = \"a\"\npassword=Sup3rSecret2\n",
        "[upstream]\nurl = \"redis://u:Sup3rSecret5@127.0.0.1:x\"\nx = 1\n",
    ] {
        let e = Config::from_toml(text).expect_err("invalid").to_string();
        assert!(!e.contains("Sup3rSecret"), "{e}");
        assert!(e.contains("line"), "{e}");
    }
    let e = parse_redis_url("redis://u:Sup3rSecret@h:x").expect_err("bad port");
    assert!(!e.contains("Sup3rSecret"), "{e}");
    // A mistyped level is not a target name.
    assert!(!valid_log_filter("wran"));
    assert!(valid_log_filter("info") && valid_log_filter("warn,kiln=debug"));
    // The list of expected keys is kept.
    let e = Config::from_toml("[server]\nmax_clientz = 3\n")
        .expect_err("unknown")
        .to_string();
    assert!(e.contains("requirepass"), "{e}");
}

#[test]
fn sizes() {
    assert_eq!(parse_size("256MiB"), Ok(256 * MIB));
    assert_eq!(parse_size("64KiB"), Ok(64 * KIB));
    assert_eq!(parse_size("17"), Ok(17));
    assert!(parse_size("12XB").is_err());
    assert!(parse_size("MiB").is_err());
}

#[test]
fn urls() {
    let a = parse_redis_url("redis://u:p@h:7000/3").expect("valid");
    assert_eq!(
        a,
        UpstreamAddr {
            host: "h".into(),
            port: 7000,
            username: Some("u".into()),
            password: Some("p".into()),
            db: 3,
            tls: false,
        }
    );
    assert_eq!(parse_redis_url("redis://h").expect("valid").port, 6379);
    assert!(parse_redis_url("http://h").is_err());
    assert!(parse_redis_url("redis://h:x").is_err());
}

#[test]
fn secrets_are_never_printed() {
    let text = "[server]\nrequirepass = \"hunter2\"\n[upstream]\nurl = \"redis://u:pw9@h:1\"\n\
                [[users]]\nname = \"r\"\npassword = \"s3cret\"\nrole = \"read\"\n";
    let cfg = Config::from_toml(text).expect("parses");
    cfg.validate(text).expect("valid");
    let printed = format!("{}\n{cfg:?}", toml::to_string(&cfg).expect("serializes"));
    for secret in ["hunter2", "pw9", "s3cret"] {
        assert!(!printed.contains(secret), "{secret} printed:\n{printed}");
    }
    assert!(printed.contains("redis://u:<redacted>@h:1"));
}

#[test]
fn tls_files_are_checked_at_load() {
    let text = "[server.tls]\ncert = \"/nonexistent/cert.pem\"\nkey = \"/nonexistent/key.pem\"\n";
    assert_invalid(text, "server.tls.cert", 2);
    let text = "[upstream]\nurl = \"redis://h:1\"\ntls_ca = \"/x.pem\"\n";
    assert_invalid(text, "upstream.tls_ca", 3);
    assert!(parse_redis_url("rediss://h:6380").expect("valid").tls);
}

/// `text` parses but fails validation, naming `key` and its line.
fn assert_invalid(text: &str, key: &str, line: usize) {
    let cfg = Config::from_toml(text).expect("parses");
    let msg = cfg.validate(text).expect_err("invalid").to_string();
    assert!(
        msg.contains(key) && msg.contains(&format!("line {line}")),
        "{msg}"
    );
}

#[test]
fn exactly_one_upstream_topology() {
    // url and cluster: the second one named, with its line.
    let both = "[upstream]\nurl = \"redis://h:1\"\ncluster = [\"h:7000\"]\n";
    assert_invalid(both, "upstream.cluster", 3);
    let msg = Config::from_toml(both)
        .expect("parses")
        .validate(both)
        .expect_err("two topologies")
        .to_string();
    assert!(msg.contains("exactly one"), "{msg}");
    let url_and_sentinel = "[upstream]\nurl = \"redis://h:1\"\n\n[upstream.sentinel]\nmaster = \"m\"\nnodes = [\"h:26379\"]\n";
    assert_invalid(url_and_sentinel, "upstream.sentinel", 4);
    let cluster_and_sentinel = "[upstream]\ncluster = [\"h:7000\"]\n[upstream.sentinel]\nmaster = \"m\"\nnodes = [\"h:1\"]\n";
    assert_invalid(cluster_and_sentinel, "upstream.sentinel", 3);
    // Each alone is fine, and says which topology it is.
    for (text, want) in [
        (
            "[upstream]\ncluster = [\"h:7000\", \"redis://u:p@h:7001\"]\n",
            "cluster",
        ),
        (
            "[upstream.sentinel]\nmaster = \"m\"\nnodes = [\"h:26379\"]\n",
            "sentinel",
        ),
        ("[upstream]\nurl = \"redis://h:1/2\"\n", "standalone"),
    ] {
        let cfg = Config::from_toml(text).expect("parses");
        cfg.validate(text).expect("valid");
        let got = match cfg.topology().expect("topology") {
            Topology::Cluster(seeds) => {
                assert_eq!(seeds[1].password.as_deref(), Some("p"));
                "cluster"
            }
            Topology::Sentinel { master, .. } => {
                assert_eq!(master, "m");
                "sentinel"
            }
            Topology::Standalone(a) => {
                assert_eq!(a.db, 2);
                "standalone"
            }
        };
        assert_eq!(got, want);
    }
}

#[test]
fn the_upstream_flag_replaces_a_cluster_or_sentinel() {
    for text in [
        "[upstream]\ncluster = [\"redis://u:secret@h:7000\"]\n",
        "[upstream.sentinel]\nmaster = \"m\"\nnodes = [\"h:26379\"]\n",
    ] {
        let mut cfg = Config::from_toml(text).expect("parses");
        assert!(
            cfg.upstream_label().starts_with("cluster ")
                || cfg.upstream_label().starts_with("sentinel m@")
        );
        assert!(
            !cfg.upstream_label().contains("secret"),
            "{}",
            cfg.upstream_label()
        );
        cfg.apply(&Overrides {
            upstream: Some("redis://other:1".into()),
            ..Default::default()
        });
        cfg.validate(text).expect("one topology");
        assert_eq!(
            cfg.topology().expect("topology"),
            Topology::Standalone(parse_redis_url("redis://other:1").expect("url"))
        );
        assert_eq!(cfg.upstream_label(), "redis://other:1");
    }
}

#[test]
fn bad_cluster_and_sentinel_settings_name_their_key() {
    assert_invalid("[upstream]\ncluster = [\"h\"]\n", "upstream.cluster", 2);
    assert_invalid("[upstream]\ncluster = [\"h:x\"]\n", "upstream.cluster", 2);
    assert_invalid("[upstream]\ncluster = []\n", "upstream.cluster", 2);
    assert_invalid(
        "[upstream]\ncluster = [\"redis://h:1/3\"]\n",
        "upstream.cluster",
        2,
    );
    assert_invalid(
        "[upstream]\ntopology_refresh = \"0s\"\n",
        "upstream.topology_refresh",
        2,
    );
    assert_invalid(
        "\n[upstream.sentinel]\nmaster = \"m\"\nnodes = []\n",
        "upstream.sentinel",
        2,
    );
    assert_invalid(
        "[upstream.sentinel]\nnodes = [\"h:1\"]\n",
        "upstream.sentinel",
        1,
    );
}

#[test]
fn users_are_checked() {
    let text = "[server]\nrequirepass = \"x\"\n\n[[users]]\nname = \"default\"\npassword = \"y\"\nrole = \"admin\"\n";
    assert_invalid(text, "users[0]", 4);
    let bad_role = "[[users]]\nname = \"a\"\npassword = \"b\"\nrole = \"root\"\n";
    let err = Config::from_toml(bad_role)
        .expect_err("bad role")
        .to_string();
    assert!(err.contains("line 4") && err.contains("root"), "{err}");
}

#[test]
fn unknown_key_names_key_and_line() {
    let err = Config::from_toml("[server]\nlisten = \"127.0.0.1:1\"\nbogus = 1\n")
        .expect_err("unknown key");
    let msg = err.to_string();
    assert!(msg.contains("bogus") && msg.contains("line 3"), "{msg}");
}

#[test]
fn bad_value_names_key_and_line() {
    assert_invalid("[upstream]\nconnections = 0\n", "upstream.connections", 2);
    // Set in an inline table, or under a sub-table's own header: the line
    // of the inline table or of the header.
    assert_invalid(
        "[warmup]\nbatch_size = 10\nhotkeys = { sample = 0 }\n",
        "warmup.hotkeys.sample",
        3,
    );
    assert_invalid(
        "[warmup]\nlock = { scope = \"fleet\", ttl = \"0s\" }\n",
        "warmup.lock.ttl",
        2,
    );
    assert_invalid("[warmup.hotkeys]\nsample = 0\n", "warmup.hotkeys.sample", 2);
    assert_invalid(
        "[admin]\nallow_remote = false\n\n[admin.rate_limits]\n\"CACHE.WARMUP\" = \"x\"\n",
        "admin.rate_limits",
        4,
    );
    let err = Config::from_toml("[cache]\nttl = \"5 parsecs\"\n").expect_err("bad duration");
    assert!(err.to_string().contains("line 2"), "{err}");
}

#[test]
fn unsafe_cached_commands_name_the_key_the_line_and_why() {
    for (text, key, line, why) in [
        (
            "[cache]\nttl = \"1m\"\ncommands = [\"GET\", \"TTL\"]\n",
            "cache.commands",
            3,
            "changes without a write",
        ),
        (
            "[cache]\ncommands = [\"srandmember\"]\n",
            "cache.commands",
            2,
            "random",
        ),
        (
            "[cache]\ncommands = [\"SCAN\"]\n",
            "cache.commands",
            2,
            "cursor",
        ),
        (
            "[cache]\ncommands = [\"GET\"]\n[[cache.rules]]\nmatch = \"a*\"\ncommands = [\"HGET\"]\n",
            "cache.rules[0].commands",
            5,
            "`HGET` is not in cache.commands",
        ),
        (
            "[cache]\ncommands = [\n  \"GET\",\n  \"HGETALL\",\n  \"TTL\",\n]\n",
            "cache.commands",
            5,
            "`TTL` cannot be cached",
        ),
        (
            "[cache]\nmax_memory = \"1MiB\"\n",
            "cache.max_memory",
            2,
            "at most a quarter",
        ),
        (
            "[cache]\nrefresh_ahead = 1.5\n",
            "cache.refresh_ahead",
            2,
            "fraction",
        ),
        (
            "[coherence]\nmode = \"ttl\"\n[cache]\nadaptive_ttl = { max = \"1h\", after_hits = 10 }\n",
            "cache.adaptive_ttl",
            4,
            "ttl",
        ),
    ] {
        let msg = Config::from_toml(text)
            .and_then(|c| c.validate(text))
            .expect_err(text)
            .to_string();
        assert!(
            msg.contains(key) && msg.contains(&format!("line {line}")) && msg.contains(why),
            "{text}: {msg}"
        );
    }
    let text = "[cache]\ncommands = [\"get\", \"HGETALL\", \"zrangebyscore\"]\ncompression = { algorithm = \"zstd\", min_size = \"2KiB\" }\nadaptive_ttl = { max = \"1h\", after_hits = 10 }\nrefresh_ahead = 0.8\n";
    let ok = Config::from_toml(text).expect("parses");
    ok.validate(text).expect("valid");
    assert_eq!(ok.cache.compression.min_size, 2048);
    assert_eq!(ok.cache.commands.len(), 3);
}

/// Values that parse but cannot mean what was meant are refused, naming
/// the key and its line: thresholds in the wrong order, a rate limit for
/// a command kiln does not have, a run that warms nothing, a 6-field cron.
#[test]
fn settings_that_cannot_mean_what_was_meant_are_refused() {
    assert_invalid(
        "[alerts]\nhit_rate_warning = 0.5\nhit_rate_critical = 0.7\n",
        "alerts.hit_rate_critical",
        3,
    );
    assert_invalid(
        "[alerts]\npenetration_critical = 0.05\n",
        "alerts.penetration_critical",
        2,
    );
    assert_invalid(
        "[admin.rate_limits]\n\"CACHE.FOO\" = \"1/s\"\n",
        "admin.rate_limits",
        1,
    );
    assert_invalid("[warmup]\nmax_keys = 0\n", "warmup.max_keys", 2);
    assert_invalid(
        "[warmup]\nschedule = \"*/30 * * * * *\"\n",
        "warmup.schedule",
        2,
    );
    // A date that never comes, an interval runs would queue behind, one
    // command limited twice under two spellings.
    assert_invalid(
        "[warmup]\nschedule = \"0 0 30 2 *\"\n",
        "warmup.schedule",
        2,
    );
    assert_invalid("[warmup]\ninterval = \"10ms\"\n", "warmup.interval", 2);
    assert_invalid(
        "[admin.rate_limits]\n\"CACHE.STATUS\" = \"1/s\"\n\"cache.status\" = \"9/s\"\n",
        "admin.rate_limits",
        1,
    );
    // Their sound neighbours pass.
    for ok in [
        "[warmup]\ninterval = \"1s\"\n",
        "[warmup]\nschedule = \"0 0 29 2 *\"\n",
        "[alerts]\nhit_rate_warning = 0.7\nhit_rate_critical = 0.7\n",
        "[admin.rate_limits]\n\"cache.hotkeys\" = \"1/s\"\n",
        "[warmup]\nschedule = \"*/30 * * * *\"\n",
        "[warmup]\nschedule = \"@hourly\"\n",
    ] {
        let cfg = Config::from_toml(ok).expect("parses");
        cfg.validate(ok).unwrap_or_else(|e| panic!("{ok}: {e}"));
    }
}

/// An inverted pair set only through its warning names the warning's line
/// (the critical key is not in the file).
#[test]
fn an_inverted_threshold_pair_names_the_key_the_file_sets() {
    assert_invalid(
        "[alerts]\npenetration_warning = 0.3\n",
        "alerts.penetration_warning",
        2,
    );
    assert_invalid(
        "[alerts]\nhit_rate_warning = 0.5\n",
        "alerts.hit_rate_warning",
        2,
    );
}
