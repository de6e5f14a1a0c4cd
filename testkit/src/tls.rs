//! TLS material for tests: a private CA and a server certificate it signed, made fresh for
//! each test (nothing is checked in), and a `redis-server` that serves TLS with them.

use std::path::{Path, PathBuf};

use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair};

use crate::{RedisServer, free_port};

/// A certificate authority made for one test, and a server certificate it signed for
/// `localhost` and `127.0.0.1`. The PEM files live in a temp dir removed on drop.
#[derive(Debug)]
pub struct TestCa {
    dir: tempfile::TempDir,
    ca_pem: String,
}

impl TestCa {
    /// Makes a new CA (its own key) and a server certificate and key signed by it.
    ///
    /// # Panics
    /// If key generation or signing fails.
    pub fn new(name: &str) -> Self {
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(DnType::CommonName, format!("testkit {name} CA"));
        let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate().expect("CA key"))
            .expect("self-sign the CA");
        let server_key = KeyPair::generate().expect("server key");
        let mut params =
            CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()])
                .expect("server params");
        params
            .distinguished_name
            .push(DnType::CommonName, "localhost");
        let server = params
            .signed_by(&server_key, &ca)
            .expect("sign the server certificate");
        let dir = tempfile::Builder::new()
            .prefix("testkit-tls-")
            .tempdir()
            .expect("temp dir for TLS files");
        let ca_pem = ca.pem();
        std::fs::write(dir.path().join("ca.pem"), &ca_pem).expect("write ca.pem");
        std::fs::write(dir.path().join("server.pem"), server.pem()).expect("write server.pem");
        std::fs::write(dir.path().join("server.key"), server_key.serialize_pem())
            .expect("write server.key");
        TestCa { dir, ca_pem }
    }

    /// The CA certificate (PEM), for the client to trust.
    pub fn ca_pem(&self) -> &str {
        &self.ca_pem
    }

    /// The directory holding `ca.pem`, `server.pem` and `server.key`.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    fn file(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
}

/// A `redis-server` serving TLS on [`TlsRedis::tls_port`] with a certificate from a
/// [`TestCa`] (clients need not present one), and plain TCP on the server's own port for
/// test setup ([`RedisServer::command`]).
#[derive(Debug)]
pub struct TlsRedis {
    /// The server; its plain port is for setup only.
    pub server: RedisServer,
    /// The CA that signed the server's certificate.
    pub ca: TestCa,
    tls_port: u16,
}

impl TlsRedis {
    /// Starts the server with a fresh CA.
    ///
    /// # Panics
    /// As [`RedisServer::start`], or if the TLS files cannot be made.
    pub fn start() -> Self {
        let ca = TestCa::new("redis");
        let tls_port = free_port();
        let port = tls_port.to_string();
        let cert = ca.file("server.pem");
        let key = ca.file("server.key");
        let ca_file = ca.file("ca.pem");
        let server = RedisServer::start_with_args(&[
            "--tls-port",
            &port,
            "--tls-cert-file",
            cert.to_str().expect("utf-8 temp path"),
            "--tls-key-file",
            key.to_str().expect("utf-8 temp path"),
            "--tls-ca-cert-file",
            ca_file.to_str().expect("utf-8 temp path"),
            "--tls-auth-clients",
            "no",
        ]);
        TlsRedis {
            server,
            ca,
            tls_port,
        }
    }

    /// The TLS port.
    pub fn tls_port(&self) -> u16 {
        self.tls_port
    }

    /// `rediss://localhost:TLS_PORT` (the certificate is for `localhost` and `127.0.0.1`).
    pub fn url(&self) -> String {
        format!("rediss://localhost:{}", self.tls_port)
    }
}
