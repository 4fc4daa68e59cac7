//! End-to-end: TLS, mutual TLS and bearer tokens between the trainer client and a loader, with
//! certificates generated here (a test CA, a server certificate for `localhost`, a client
//! certificate).

use std::{path::Path, sync::atomic::Ordering::Relaxed, time::Duration};

use conveyor_tests::InProcessLoader;
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
use trainer_client::{
    AuthToken, ClientError, ConnectOptions, Loaders, PlanSettings, RunSpec, Shuffle, StreamOptions, TlsOptions, demo,
};

const SAMPLES: u64 = 3_000;

/// A CA and the PEM files it signed, in a temporary directory.
struct Pki {
    dir: tempfile::TempDir,
}

impl Pki {
    fn new() -> Pki {
        let dir = tempfile::tempdir().expect("tempdir");
        let ca_key = KeyPair::generate().expect("key");
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("params");
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params.distinguished_name.push(DnType::CommonName, "conveyor test CA");
        let ca_cert = ca_params.self_signed(&ca_key).expect("CA");
        let issuer = Issuer::new(ca_params, ca_key);
        let write = |name: &str, text: String| std::fs::write(dir.path().join(name), text).expect("write pem");
        write("ca.pem", ca_cert.pem());
        for (name, sans) in
            [("server", vec!["localhost".to_owned(), "127.0.0.1".to_owned()]), ("client", vec!["trainer".to_owned()])]
        {
            let key = KeyPair::generate().expect("key");
            let cert = CertificateParams::new(sans).expect("params").signed_by(&key, &issuer).expect("sign");
            write(&format!("{name}.pem"), cert.pem());
            write(&format!("{name}.key"), key.serialize_pem());
        }
        // A second CA, which signed nothing the loader serves.
        let other_key = KeyPair::generate().expect("key");
        let mut other = CertificateParams::new(Vec::<String>::new()).expect("params");
        other.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        write("other-ca.pem", other.self_signed(&other_key).expect("CA").pem());
        Pki { dir }
    }

    fn path(&self, name: &str) -> std::path::PathBuf {
        self.dir.path().join(name)
    }

    fn client_tls(&self, with_identity: bool) -> TlsOptions {
        let (cert, key) = (self.path("client.pem"), self.path("client.key"));
        let identity = with_identity.then_some((cert.as_path(), key.as_path()));
        TlsOptions::from_files(Some(&self.path("ca.pem")), identity.map(|i| i.0), identity.map(|i| i.1))
            .expect("tls files")
    }
}

fn chess() -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("tempdir");
    demo::write_chess_dataset(dir.path(), SAMPLES, 1_000).expect("demo data");
    dir
}

fn config(data: &Path) -> loader_server::Config {
    loader_server::Config::for_datasets([format!("chess={}", data.display())])
}

fn options(connect: ConnectOptions) -> StreamOptions {
    StreamOptions { connect, unavailable_timeout: Duration::from_secs(5), ..StreamOptions::default() }
}

/// Streams one epoch and returns how many distinct samples arrived.
async fn stream_epoch(loader: &str, options: StreamOptions) -> Result<usize, ClientError> {
    let loaders = Loaders::connect(&[loader.to_owned()], options).await?;
    let settings = PlanSettings { batch_size: 100, shuffle: Shuffle::Full, ..PlanSettings::default() };
    let plan = loaders.plan("chess", &settings)?;
    let mut run = loaders.run(RunSpec::new("chess", plan, 0..1))?;
    let mut seen = std::collections::BTreeSet::new();
    while let Some(batch) = run.next_batch().await? {
        seen.extend(batch.indices);
    }
    Ok(seen.len())
}

fn port(loader: &InProcessLoader) -> &str {
    loader.addr.rsplit_once(':').expect("host:port").1
}

#[tokio::test]
async fn tls_serves_an_epoch_and_refuses_plain_and_untrusted_clients() {
    let (pki, data) = (Pki::new(), chess());
    let mut config = config(data.path());
    config.tls_cert = Some(pki.path("server.pem"));
    config.tls_key = Some(pki.path("server.key"));
    let loader = InProcessLoader::start(config).await;
    let https = format!("https://localhost:{}", port(&loader));

    let tls = ConnectOptions { tls: Some(pki.client_tls(false)), ..ConnectOptions::default() };
    assert_eq!(stream_epoch(&https, options(tls)).await.expect("epoch over TLS"), SAMPLES as usize);

    // Plain HTTP/2 to a TLS port.
    let plain = stream_epoch(&loader.addr, options(ConnectOptions::default())).await;
    assert!(matches!(plain, Err(ClientError::Unavailable { .. })), "{plain:?}");
    let hint = plain.expect_err("refused").to_string();
    assert!(hint.contains(&format!("https://{}", loader.addr)), "no hint to use https://: {hint}");

    // A CA that did not sign the loader's certificate.
    let other = TlsOptions::from_files(Some(&pki.path("other-ca.pem")), None, None).expect("tls");
    let untrusted =
        stream_epoch(&https, options(ConnectOptions { tls: Some(other), ..ConnectOptions::default() })).await;
    let message = format!("{:?}", untrusted.expect_err("untrusted certificate accepted"));
    assert!(message.to_lowercase().contains("certificate"), "{message}");

    // The certificate names localhost and 127.0.0.1, not this name.
    let mut wrong_name = pki.client_tls(false);
    wrong_name.domain = Some("loader.example".into());
    let mismatch =
        stream_epoch(&https, options(ConnectOptions { tls: Some(wrong_name), ..ConnectOptions::default() })).await;
    assert!(mismatch.is_err(), "a certificate for another name was accepted");
    loader.stop().await;
}

#[tokio::test]
async fn mutual_tls_needs_a_client_certificate_signed_by_the_client_ca() {
    let (pki, data) = (Pki::new(), chess());
    let mut config = config(data.path());
    config.tls_cert = Some(pki.path("server.pem"));
    config.tls_key = Some(pki.path("server.key"));
    config.tls_client_ca = Some(pki.path("ca.pem"));
    let loader = InProcessLoader::start(config).await;
    let https = format!("https://localhost:{}", port(&loader));

    let with_cert = ConnectOptions { tls: Some(pki.client_tls(true)), ..ConnectOptions::default() };
    assert_eq!(stream_epoch(&https, options(with_cert)).await.expect("mutual TLS epoch"), SAMPLES as usize);

    let without = ConnectOptions { tls: Some(pki.client_tls(false)), ..ConnectOptions::default() };
    let refused = stream_epoch(&https, options(without)).await;
    assert!(refused.is_err(), "a client without a certificate was served");
    loader.stop().await;
}

#[tokio::test]
async fn tokens_right_wrong_and_missing() {
    let data = chess();
    let tokens = tempfile::NamedTempFile::new().expect("token file");
    std::fs::write(tokens.path(), "# trainers\nright-token\nsecond-token\n").expect("write tokens");
    let mut config = config(data.path());
    config.auth_token_file = Some(tokens.path().to_owned());
    let loader = InProcessLoader::start(config).await;
    let addrs = loader.addr.clone();
    let with = |token: Option<&str>| {
        options(ConnectOptions {
            auth_token: token.map(|t| AuthToken::new(t).expect("token")),
            ..ConnectOptions::default()
        })
    };

    assert_eq!(stream_epoch(&addrs, with(Some("second-token"))).await.expect("right token"), SAMPLES as usize);

    let wrong = stream_epoch(&addrs, with(Some("wrong-token"))).await.expect_err("wrong token served");
    assert!(matches!(wrong, ClientError::Refused { .. }), "{wrong}");
    let text = wrong.to_string();
    assert!(text.contains("does not accept the token") && text.contains("--auth-token-file"), "{text}");
    assert!(!text.contains("wrong-token") && !text.contains("right-token"), "a token leaked into: {text}");

    let missing = stream_epoch(&addrs, with(None)).await.expect_err("no token served");
    assert!(
        missing.to_string().contains("requires a token") && missing.to_string().contains("CONVEYOR_AUTH_TOKEN"),
        "{missing}"
    );
    assert!(loader.state.stats.auth_refused.load(Relaxed) >= 2);

    // The health service stays open for probes.
    assert_eq!(loader.health().await, tonic_health::pb::health_check_response::ServingStatus::Serving);
    loader.stop().await;
}

#[test]
fn a_loader_certificate_outside_its_validity_dates_is_warned_about_with_the_fix() {
    use std::time::{Duration, SystemTime};
    let key = KeyPair::generate().expect("key");
    let cert = |from: (i32, u8, u8), to: (i32, u8, u8)| {
        let mut params = CertificateParams::new(vec!["localhost".to_owned()]).expect("params");
        params.not_before = rcgen::date_time_ymd(from.0, from.1, from.2);
        params.not_after = rcgen::date_time_ymd(to.0, to.1, to.2);
        params.self_signed(&key).expect("cert").pem().into_bytes()
    };
    // 2026-12-06T00:00:00Z.
    let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_796_515_200);
    let problem = |pem: &[u8]| loader_server::serve::tls::validity_problem(pem, now);

    let expired = problem(&cert((2025, 1, 1), (2026, 1, 1))).expect("an expired certificate passes unnoticed");
    assert!(expired.starts_with("expired on") && expired.contains("339 days ago"), "{expired}");
    assert!(expired.contains("give the loader a current certificate"), "{expired}");
    let early = problem(&cert((2027, 1, 1), (2028, 1, 1))).expect("a future certificate passes unnoticed");
    assert!(early.contains("is not valid until") && early.contains("in 26 days"), "{early}");
    assert!(early.contains("check this host's clock"), "{early}");
    let ending = problem(&cert((2026, 1, 1), (2026, 12, 9))).expect("an ending certificate passes unnoticed");
    assert!(ending.contains("expires on") && ending.contains("in 3 days"), "{ending}");
    assert_eq!(problem(&cert((2026, 1, 1), (2027, 6, 1))), None);
    assert_eq!(problem(b"not a certificate"), None, "unreadable PEM is the handshake's to report");
}
