use super::*;

fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

#[test]
fn defaults_are_valid() {
    Config::default()
        .validate()
        .expect("defaults must validate");
}

#[test]
fn environment_overrides_file_and_defaults() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("instream.toml");
    std::fs::write(
        &path,
        "[kafka]\nbootstrap_servers = \"file:9092\"\ncommit_interval = \"3s\"\n",
    )
    .unwrap();
    let config = Config::load_from(
        Some(&path),
        env(&[
            ("INSTREAM__KAFKA__BOOTSTRAP_SERVERS", "env:9092"),
            ("INSTREAM__INGEST__MAX_EVENTS_PER_REQUEST", "7"),
            ("INSTREAM_TEST_KAFKA", "ignored:1"),
        ]),
    )
    .unwrap();
    assert_eq!(config.kafka.bootstrap_servers, "env:9092");
    assert_eq!(config.kafka.commit_interval, Duration::from_secs(3));
    assert_eq!(config.ingest.max_events_per_request, 7);
}

#[test]
fn unknown_key_is_refused_by_name() {
    let err = Config::from_toml("[kafka]\nbootstrap_server = \"x:1\"\n").unwrap_err();
    let text = err.to_string();
    assert!(text.contains("bootstrap_server"), "{text}");
}

#[test]
fn wrong_type_names_the_key() {
    let err =
        Config::load_from(None, env(&[("INSTREAM__INGEST__MAX_BODY_BYTES", "lots")])).unwrap_err();
    let text = err.to_string();
    assert!(text.contains("max_body_bytes"), "{text}");
}

#[test]
fn every_broken_rule_is_reported_at_once() {
    let err = Config::from_toml(
        "[kafka]\nbootstrap_servers = \"\"\n[archiver]\nzstd_level = 40\n[store]\nkeyspace = \"a-b\"\n",
    )
    .unwrap_err();
    let ConfigError::Invalid(problems) = err else {
        panic!("expected validation errors, got {err}");
    };
    let keys: Vec<&str> = problems.iter().map(|p| p.key.as_str()).collect();
    assert_eq!(
        keys,
        [
            "kafka.bootstrap_servers",
            "store.keyspace",
            "archiver.zstd_level"
        ]
    );
}

#[test]
fn guarded_kafka_properties_are_refused() {
    let err =
        Config::from_toml("[kafka.consumer]\n\"enable.auto.commit\" = \"true\"\n").unwrap_err();
    assert!(
        err.to_string()
            .contains("kafka.consumer.enable.auto.commit"),
        "{err}"
    );
}

#[test]
fn drain_must_fit_in_the_session_timeout() {
    let err = Config::from_toml("[shutdown]\ndrain_timeout = \"60s\"\n").unwrap_err();
    assert!(err.to_string().contains("shutdown.drain_timeout"), "{err}");
}

#[test]
fn digits_given_to_a_string_field_stay_a_string() {
    let config = Config::load_from(
        None,
        env(&[
            ("INSTREAM__STORE__USERNAME", "42"),
            ("INSTREAM__STORE__PASSWORD", "123456"),
            ("INSTREAM__KAFKA__REPLICATION_FACTOR", "2"),
        ]),
    )
    .unwrap();
    assert_eq!(
        config.store.password.as_ref().map(Secret::expose),
        Some("123456")
    );
    assert_eq!(config.store.username.as_deref(), Some("42"));
    assert_eq!(config.kafka.replication_factor, 2);
}

#[test]
fn a_bad_log_filter_is_refused() {
    let err = Config::from_toml("[telemetry]\nlog_level = \"info,=x=y[\"\n").unwrap_err();
    assert!(err.to_string().contains("telemetry.log_level"), "{err}");
}

#[test]
fn cooperative_assignment_is_refused() {
    let err = Config::from_toml(
        "[kafka.consumer]\n\"partition.assignment.strategy\" = \"cooperative-sticky\"\n",
    )
    .unwrap_err();
    assert!(
        err.to_string().contains("partition.assignment.strategy"),
        "{err}"
    );
}

#[test]
fn the_periodic_audit_waits_longer_than_the_archiver_keeps_a_file_open() {
    let err = Config::from_toml("[archiver]\nroll_max_age = \"1h\"\n").unwrap_err();
    assert!(err.to_string().contains("query_api.audit_settle"), "{err}");
    for fine in [
        "[archiver]\nroll_max_age = \"1h\"\n[query_api]\naudit_settle = \"90m\"\n",
        "[archiver]\nroll_max_age = \"1h\"\n[query_api]\naudit_archive = false\n",
        "[archiver]\nroll_max_age = \"1h\"\n[query_api]\naudit_every = \"0s\"\n",
    ] {
        Config::from_toml(fine).unwrap();
    }
    let err = Config::from_toml("[query_api]\naudit_lookback = \"30m\"\n").unwrap_err();
    assert!(
        err.to_string().contains("query_api.audit_lookback"),
        "{err}"
    );
}

#[test]
fn enricher_transactions_need_a_kafka_cluster() {
    let err = Config::from_toml(
        "[kafka]\nbroker = \"embedded\"\n[enricher]\ndelivery = \"transactional\"\n",
    )
    .unwrap_err();
    assert!(err.to_string().contains("enricher.delivery"), "{err}");
    let auto = Config::from_toml("[kafka]\nbroker = \"embedded\"\n").unwrap();
    assert!(
        !auto.enricher_transactional(),
        "auto: at least once on the embedded broker"
    );
    assert!(
        Config::default().enricher_transactional(),
        "auto: transactions on Kafka"
    );
}

#[test]
fn archive_retention_must_outlive_the_topics() {
    let err = Config::from_toml("[archiver]\nretention = \"7d\"\n").unwrap_err();
    assert!(err.to_string().contains("archiver.retention"), "{err}");
    Config::from_toml("[archiver]\nretention = \"0s\"\n").expect("0s keeps files forever");
    Config::from_toml("[archiver]\nretention = \"7d\"\n[kafka]\nretention = \"7d\"\n")
        .expect("equal is fine");
}

#[test]
fn an_hdfs_nameservice_needs_its_namenodes() {
    let err = Config::from_toml(
        "[archive]\nhdfs_url = \"hdfs://ns1\"\nhdfs_config = { \"dfs.ha.namenodes.other\" = \"a,b\" }\n",
    )
    .unwrap_err();
    assert!(err.to_string().contains("dfs.ha.namenodes.ns1"), "{err}");
    Config::from_toml(
        "[archive]\nhdfs_url = \"hdfs://ns1\"\n[archive.hdfs_config]\n\"dfs.ha.namenodes.ns1\" = \"a,b\"\n\"dfs.namenode.rpc-address.ns1.a\" = \"h1:8020\"\n\"dfs.namenode.rpc-address.ns1.b\" = \"h2:8020\"\n",
    )
    .expect("an HA nameservice spelled out");
    Config::from_toml(
        "[archive]\nhdfs_url = \"hdfs://namenode\"\nhdfs_config = { \"dfs.client.socket-timeout\" = \"30000\" }\n",
    )
    .expect("a plain host on the default port, with other client settings");
    let err = Config::from_toml("[archive]\nkerberos_keytab = \"/k.keytab\"\n").unwrap_err();
    assert!(err.to_string().contains("archive.kerberos_keytab"), "{err}");
}

#[test]
fn zookeeper_tls_needs_its_authority_and_readable_files() {
    let err = Config::from_toml("[zookeeper.tls]\ncert_file = \"/etc/hostname\"\n").unwrap_err();
    let text = err.to_string();
    assert!(text.contains("zookeeper.tls.ca_file"), "{text}");
    assert!(
        text.contains("zookeeper.tls.cert_file and zookeeper.tls.key_file go together"),
        "{text}"
    );
    let err = Config::from_toml("[zookeeper.tls]\nca_file = \"/nowhere/ca.pem\"\n").unwrap_err();
    assert!(
        err.to_string()
            .contains("zookeeper.tls.ca_file: /nowhere/ca.pem is not a readable file"),
        "{err}"
    );
    Config::from_toml("[zookeeper.tls]\nca_file = \"/etc/hostname\"\n").unwrap();
}

#[test]
fn zookeeper_auth_and_connect_are_checked() {
    let err = Config::from_toml("[zookeeper]\nauth = \"nopassword\"\n").unwrap_err();
    assert!(err.to_string().contains("zookeeper.auth"), "{err}");
    let err = Config::from_toml("[zookeeper]\nconnect = \"zk:2181/instream\"\n").unwrap_err();
    assert!(err.to_string().contains("zookeeper.root"), "{err}");
}

#[test]
fn redaction_hides_secrets() {
    let mut config = Config::default();
    config.refdata.redis_url = "redis://user:hun@ter2@redis:6379/0".into();
    config.store.password = Some("s3cret".into());
    config.zookeeper.auth = Some("instream:zkpass".into());
    config.db_source.url = "postgres://reader:pgpass@db:5432/shop".into();
    config
        .kafka
        .properties
        .insert("sasl.oauthbearer.config".into(), "token=kpass".into());
    config.kafka.sasl_password = Some("kafkapw".into());
    config.refdata.redis_password = Some("redispw".into());
    assert!(
        !format!("{:?}", config.zookeeper).contains("zkpass"),
        "Debug of the ZooKeeper section hides auth"
    );
    let text = format!("{:?}", config.redacted());
    assert!(!format!("{:?}", config.db_source).contains("pgpass"));
    for (url, shown) in [
        ("postgres://u:ab/cd@db/shop", "postgres://u:***@db/shop"),
        ("postgres://u:pa?ss@db/shop", "postgres://u:***@db/shop"),
        (
            "postgres://u:p@ss@db/shop?password=x",
            "postgres://u:***@db/shop?password=***",
        ),
        (
            "postgres://db/shop?user=u&password=pw&sslmode=disable",
            "postgres://db/shop?user=u&password=***&sslmode=disable",
        ),
        ("redis://redis:6379/0", "redis://redis:6379/0"),
    ] {
        assert_eq!(super::redact_url(url), shown);
    }
    let printed = serde_json::to_string(&config.redacted()).unwrap();
    for secret in [
        "hun@ter2", "ter2", "s3cret", "kpass", "zkpass", "pgpass", "kafkapw", "redispw",
    ] {
        assert!(!text.contains(secret), "{secret} leaked: {text}");
        assert!(!printed.contains(secret), "{secret} leaked: {printed}");
    }
    assert!(text.contains("redis://user:***@redis:6379/0"), "{text}");
}

#[test]
fn a_bad_number_from_the_environment_says_why() {
    let err = Config::load_from(None, env(&[("INSTREAM__INGEST__MAX_BODY_BYTES", "-1")]))
        .unwrap_err()
        .to_string();
    assert!(err.contains("max_body_bytes"), "{err}");
    assert!(err.contains("-1"), "{err}");
}

#[test]
fn sql_tables_are_checked_before_anything_runs() {
    let err = Config::from_toml(
        "[db_source]\nurl = \"mysql://x\"\nbatch_rows = 0\n\
         [[db_source.tables]]\nname = \"a/b\"\npipeline = \"p\"\ntable = \"x; DROP TABLE y\"\nmode = \"timestamp+incrementing\"\ntimestamp_column = \"ts\"\n\
         [[db_source.tables]]\nname = \"ok\"\npipeline = \"p\"\ntable = \"s.t\"\nmode = \"incrementing\"\nincrementing_column = \"id\"\n\
         [[db_source.tables]]\nname = \"ok\"\npipeline = \"p\"\ntable = \"t\"\nmode = \"timestamp\"\ntimestamp_column = \"Bad Column\"\n",
    )
    .unwrap_err()
    .to_string();
    for key in [
        "db_source.url",
        "db_source.batch_rows",
        "db_source.tables[0].name",
        "db_source.tables[0].table",
        "db_source.tables[0].incrementing_column: the mode needs this column",
        "db_source.tables[2].name: `ok` names two tables",
        "db_source.tables[2].timestamp_column",
    ] {
        assert!(err.contains(key), "{key} missing from: {err}");
    }
    assert!(!err.contains("tables[1]"), "{err}");
    let err = Config::from_toml("[[db_source.tables]]\nmode = \"snapshot\"\n").unwrap_err();
    assert!(err.to_string().contains("mode"), "{err}");
}

#[test]
fn store_consistency_must_let_a_restore_read_the_last_checkpoint() {
    let with =
        |levels: &str| Config::from_toml(&format!("[store]\nreplication_factor = 3\n{levels}\n"));
    with("").expect("local_quorum both ways");
    with("write_consistency = \"all\"\nread_consistency = \"one\"").expect("3 + 1 > 3");
    let err = with("write_consistency = \"one\"\nread_consistency = \"local_one\"")
        .unwrap_err()
        .to_string();
    assert!(err.contains("store.read_consistency"), "{err}");
    assert!(err.contains("W + R must exceed"), "{err}");
    let err = Config::from_toml("[store]\nreplication_factor = 1\nwrite_consistency = \"two\"\n")
        .unwrap_err()
        .to_string();
    assert!(err.contains("store.write_consistency"), "{err}");
    with("local_dc = \"eu-west\"").expect("a named data centre");
    let err = with("local_dc = \" \"").unwrap_err().to_string();
    assert!(err.contains("store.local_dc"), "{err}");
}

#[test]
fn a_tls_authority_goes_with_rediss_urls_in_every_mode() {
    let sentinel = "[refdata]\nbackend = \"redis\"\nredis_mode = \"sentinel\"\ntls_ca_file = \"/etc/ca.pem\"\n";
    for (urls, accepted) in [
        ("redis_nodes = [\"rediss://s1:26379\"]\n", true),
        (
            "redis_url = \"rediss://m\"\nredis_nodes = [\"redis://s1:26379\"]\n",
            true,
        ),
        ("redis_nodes = [\"redis://s1:26379\"]\n", false),
        // A mix of plain and TLS sentinels.
        (
            "redis_nodes = [\"rediss://s1:26379\", \"redis://s2:26379\"]\n",
            false,
        ),
    ] {
        let result = Config::from_toml(&format!("{sentinel}{urls}"));
        assert_eq!(result.is_ok(), accepted, "{urls}: {:?}", result.err());
        if let Err(err) = result {
            assert!(err.to_string().contains("refdata."), "{err}");
        }
    }
}

#[test]
fn secrets_come_from_the_environment_or_a_file_never_needing_the_config_file() {
    let dir = tempfile::tempdir().unwrap();
    let password_file = dir.path().join("sasl");
    std::fs::write(&password_file, "from-a-file\n").unwrap();
    let digest_file = dir.path().join("zk");
    std::fs::write(&digest_file, "instream:zk-pw").unwrap();
    let config = Config::load_from(
        None,
        env(&[
            (
                "INSTREAM__KAFKA__SASL_PASSWORD_FILE",
                password_file.to_str().unwrap(),
            ),
            ("INSTREAM__KAFKA__SSL_KEY_PASSWORD", "from-the-env"),
            ("INSTREAM__REFDATA__REDIS_PASSWORD", "redis-pw"),
            (
                "INSTREAM__ZOOKEEPER__AUTH_FILE",
                digest_file.to_str().unwrap(),
            ),
        ]),
    )
    .unwrap();
    let properties: Vec<(&str, &str)> = config
        .kafka
        .secret_properties()
        .map(|(p, s)| (p, s.expose()))
        .collect();
    assert_eq!(
        properties,
        [
            ("sasl.password", "from-a-file"),
            ("ssl.key.password", "from-the-env")
        ]
    );
    assert_eq!(
        config.refdata.redis_password.as_ref().map(Secret::expose),
        Some("redis-pw")
    );
    let err = Config::load_from(
        None,
        env(&[(
            "INSTREAM__ZOOKEEPER__AUTH_FILE",
            password_file.to_str().unwrap(),
        )]),
    )
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("zookeeper.auth: must be `user:password`"),
        "{err}"
    );
    let err = Config::load_from(
        None,
        env(&[
            ("INSTREAM__KAFKA__SASL_PASSWORD", "a"),
            ("INSTREAM__KAFKA__SASL_PASSWORD_FILE", "/nonexistent"),
        ]),
    )
    .unwrap_err()
    .to_string();
    assert!(
        err.contains(
            "kafka.sasl_password: give kafka.sasl_password or kafka.sasl_password_file, not both"
        ),
        "{err}"
    );
    let err = Config::load_from(
        None,
        env(&[("INSTREAM__DB_SOURCE__PASSWORD_FILE", "/nonexistent/pw")]),
    )
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("db_source.password_file: /nonexistent/pw"),
        "{err}"
    );
    let err = Config::from_toml("[kafka.properties]\n\"sasl.password\" = \"x\"\n")
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("kafka.properties.sasl.password: give it as kafka.sasl_password"),
        "{err}"
    );
    assert!(err.contains("INSTREAM__KAFKA__SASL_PASSWORD"), "{err}");
}

#[test]
fn a_json_file_is_read_as_json_and_the_checks_of_a_service_name_their_key() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("instream.json");
    std::fs::write(
        &path,
        r#"{"kafka": {"bootstrap_servers": "kafka:9092", "replication_factor": 2}}"#,
    )
    .unwrap();
    let config = Config::load_from(Some(&path), env(&[])).unwrap();
    assert_eq!(config.kafka.replication_factor, 2);
    let err = config
        .check_for(crate::Service::Ingest)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("ingest.api_keys: ingest refuses to start"),
        "{err}"
    );
    assert!(config.check_for(crate::Service::Enricher).is_ok());
    let mut embedded = config.clone();
    embedded.kafka.broker = BrokerMode::Embedded;
    let err = embedded
        .check_for(crate::Service::Enricher)
        .unwrap_err()
        .to_string();
    assert!(err.contains("kafka.broker"), "{err}");
}

#[test]
fn the_secret_keys_list_names_every_secret_slot() {
    let mut config = Config::default();
    let mut keys = Vec::new();
    let _ = config.each_secret(|slot| {
        keys.push(slot.key);
        Ok(())
    });
    assert_eq!(keys, super::secret::SECRET_KEYS);
}

#[test]
fn kafka_property_values_may_be_numbers_or_booleans() {
    let config = Config::from_toml(
        "[kafka.producer]\n\"linger.ms\" = 5\n\"enable.ssl.certificate.verification\" = true\n\
         \"sasl.oauthbearer.assertion.private.key.passphrase\" = \"hush\"\n",
    )
    .unwrap();
    assert_eq!(
        config.kafka.producer.get("linger.ms").map(String::as_str),
        Some("5")
    );
    assert_eq!(
        config
            .kafka
            .producer
            .get("enable.ssl.certificate.verification")
            .map(String::as_str),
        Some("true")
    );
    assert!(!format!("{:?}", config.kafka).contains("hush"));
}
