//! `https` deployments: certificate verification against a configured CA,
//! SNI and hostname checks, HTTP/2 via ALPN, and a wrong certificate refused.

use crate::common::*;
use collie_mock::{Behavior, MockConfig, MockServer, MockTls};
use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};
use serde_json::json;

struct Ca(CertifiedIssuer<'static, KeyPair>);

struct Leaf {
    chain_pem: String,
    key_pem: String,
}

impl Ca {
    fn new() -> Ca {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        Ca(CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap())
    }

    fn pem(&self) -> String {
        self.0.pem()
    }

    /// A server certificate for `names`, signed by this CA.
    fn leaf(&self, names: &[&str]) -> Leaf {
        let key = KeyPair::generate().unwrap();
        let cert = CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())
            .unwrap()
            .signed_by(&key, &self.0)
            .unwrap();
        Leaf {
            chain_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        }
    }
}

async fn tls_mock(p: &Leaf, alpn_h2: bool) -> MockServer {
    MockServer::start(MockConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        tls: Some(MockTls {
            cert_chain_pem: p.chain_pem.clone(),
            key_pem: p.key_pem.clone(),
            alpn_h2,
        }),
        h2c: false,
        default: Behavior::default(),
        record: true,
        dims: 4,
    })
    .await
    .unwrap()
}

/// Model `secure`: deployment `t` over HTTPS at `url` (trusting `ca_file`),
/// falling back to `p` on plain HTTP.
fn config(url: &str, ca_file: &str, http2: bool, fallback: &MockServer) -> Conf {
    Conf::two_tenants(&[])
        .model(Model::new("secure", &["tls", "plain"]))
        .pool(Pool::new("tls", &["t"]))
        .pool(Pool::new("plain", &["p"]))
        .deployment(
            Deployment::new("t", url, "m-tls")
                .key("KEY_A")
                .set("ca_file", ca_file)
                .set("http2", http2),
        )
        .deployment(Deployment::on("p", fallback, "m-plain"))
}

fn body() -> serde_json::Value {
    json!({"model": "secure", "messages": [{"role": "user", "content": "hi"}]})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verified_tls_with_h2_and_h1() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new();
    let ca_file = dir.path().join("ca.pem");
    std::fs::write(&ca_file, ca.pem()).unwrap();
    let leaf = ca.leaf(&["localhost"]);
    let plain = mock().await;
    for (h2, version) in [(true, "HTTP/2.0"), (false, "HTTP/1.1")] {
        let secure = tls_mock(&leaf, true).await;
        // A provider's path prefix (as Azure's `/openai/...`) is kept.
        let url = format!("https://localhost:{}/openai/v1", secure.addr().port());
        let gw = gateway(&config(&url, ca_file.to_str().unwrap(), h2, &plain)).await;
        for _ in 0..3 {
            let r = gw.chat(body()).send().await.unwrap();
            assert_eq!(r.status(), 200);
            assert_eq!(r.headers()["x-collie-model"], "m-tls");
        }
        let got = posts(&secure);
        assert_eq!(got[0].version, version);
        assert_eq!(got[0].path, "/openai/v1/chat/completions");
        let names = secure.tls_server_names();
        assert!(!names.is_empty());
        assert!(
            names.iter().all(|n| n == "localhost"),
            "SNI names the host: {names:?}"
        );
        assert_eq!(
            recorded_header(&got[0], "authorization").as_deref(),
            Some(format!("Bearer {PROVIDER_KEY_A}").as_str())
        );
        // Streams work over TLS too.
        let r = gw
            .chat(json!({"model": "secure", "stream": true, "messages": []}))
            .send()
            .await
            .unwrap();
        assert!(r.bytes().await.unwrap().ends_with(b"data: [DONE]\n\n"));
    }
    assert_eq!(plain.completion_calls(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_certificates_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let trusted = Ca::new();
    let ca_file = dir.path().join("ca.pem");
    std::fs::write(&ca_file, trusted.pem()).unwrap();
    let plain = mock().await;

    let stranger = tls_mock(&Ca::new().leaf(&["localhost"]), false).await;
    let misnamed = tls_mock(&trusted.leaf(&["not-localhost.example"]), false).await;
    for (what, server) in [("untrusted CA", &stranger), ("wrong host name", &misnamed)] {
        let url = format!("https://localhost:{}/v1", server.addr().port());
        let gw = gateway(&config(&url, ca_file.to_str().unwrap(), false, &plain)).await;
        let r = gw.chat(body()).send().await.unwrap();
        assert_eq!(r.status(), 200, "{what}: falls back");
        assert_eq!(r.headers()["x-collie-model"], "m-plain", "{what}");
        assert_eq!(
            server.completion_calls(),
            0,
            "{what}: nothing sent over an unverified connection"
        );
    }
}
