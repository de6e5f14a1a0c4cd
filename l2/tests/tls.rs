//! TLS (`rediss://`, rustls) against a real redis-server with `--tls-port` and a CA made in
//! the test: the right CA works for commands and pub/sub, a wrong CA or none is a clear
//! error, and `#insecure` is refused unless asked for.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use l2::{Codec, Connection, EntryMeta, Error, Event, KeySpace, RedisStore, Subscriber, TypeTag};
use testkit::{TestCa, TlsRedis};

#[tokio::test]
async fn the_right_ca_works_for_commands_and_pub_sub() {
    let redis = TlsRedis::start();
    let conn = Connection::builder(redis.url())
        .tls_root_certificate(redis.ca.ca_pem())
        .connect()
        .await
        .expect("TLS with the server's CA");
    let store = RedisStore::new(conn.clone());
    let codec = Codec::<String>::new(TypeTag::from_name("tls.String/v1"));
    let key = KeySpace::new("tls").key("k");
    store
        .set(
            &key,
            &codec,
            &"over tls".to_string(),
            &EntryMeta::new(Duration::from_secs(10)),
        )
        .await
        .unwrap();
    assert_eq!(
        store.get(&key, &codec).await.unwrap().unwrap().value,
        "over tls"
    );

    // The subscriber opens its own TLS connection with the same CA.
    let subscriber = Subscriber::connect(&conn).await.unwrap();
    let got: Arc<Mutex<Vec<Vec<u8>>>> = Arc::default();
    let sink = Arc::clone(&got);
    subscriber
        .listen("tls:chan", move |e| {
            if let Event::Message { payload, .. } = e {
                sink.lock().unwrap().push(payload.to_vec());
            }
        })
        .await
        .unwrap();
    store.publish("tls:chan", b"sealed").await.unwrap();
    let start = std::time::Instant::now();
    while got.lock().unwrap().is_empty() {
        assert!(
            start.elapsed() < Duration::from_secs(2),
            "no message over TLS"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert_eq!(got.lock().unwrap()[0], b"sealed");
    // The store and the subscriber are two clients of the server, beside this one.
    let clients = redis.server.command(&["CLIENT", "LIST"]);
    assert!(clients.lines().count() >= 3, "{clients}");
}

#[tokio::test]
async fn a_wrong_ca_or_none_is_a_clear_tls_error() {
    let redis = TlsRedis::start();
    let other = TestCa::new("someone else's");
    for (what, builder) in [
        (
            "a CA that did not sign the server's certificate",
            Connection::builder(redis.url()).tls_root_certificate(other.ca_pem()),
        ),
        ("the system's roots", Connection::builder(redis.url())),
    ] {
        let err = builder
            .connect_timeout(Duration::from_millis(500))
            .connect()
            .await
            .expect_err(what);
        assert!(matches!(err, Error::Tls { .. }), "{what}: {err:?}");
        let text = err.to_string();
        assert!(
            text.contains("TLS") && text.to_lowercase().contains("certificate"),
            "{what}: {text}"
        );
        println!("{what}: {text}");
    }
}

#[tokio::test]
async fn insecure_urls_are_refused_unless_asked_for() {
    let redis = TlsRedis::start();
    let url = format!("{}/#insecure", redis.url());
    let err = Connection::builder(&url)
        .connect()
        .await
        .expect_err("refused");
    assert!(matches!(err, Error::Config(_)), "{err:?}");
    assert!(err.to_string().contains("#insecure"), "{err}");
    // Asked for explicitly, it connects without checking the certificate.
    let conn = Connection::builder(&url)
        .danger_accept_invalid_certificates(true)
        .connect()
        .await
        .expect("insecure TLS when asked for");
    conn.ping().await.unwrap();
}

#[test]
fn debug_output_never_shows_the_url() {
    let builder = Connection::builder("rediss://cache:s3cret-pw@localhost:6380")
        .tls_root_certificate("-----BEGIN CERTIFICATE-----");
    let text = format!("{builder:?}");
    assert!(
        !text.contains("s3cret-pw") && !text.contains("localhost"),
        "{text}"
    );
    assert!(!text.contains("BEGIN CERTIFICATE"), "{text}");
}
