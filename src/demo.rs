//! `collie demo`: the embedded demo config in front of two local mock
//! providers, all in one process, so a newcomer has a working gateway with
//! one command. A module of the binary, not of the library: the gateway's
//! library knows nothing of the mock.

use collie::config::Config;
use collie::server::Collie;
use collie_mock::{Behavior, MockConfig, MockServer};
use std::net::SocketAddr;
use std::time::Duration;

/// The demo config, compiled in so the binary runs from anywhere.
pub(crate) const DEMO_CONFIG: &str = include_str!("../conf/demo.yaml");
/// The provider key the demo deployments send to the mocks.
const DEMO_PROVIDER_KEY: &str = "sk-demo-provider";
/// The mock ports the demo config names.
pub(crate) const MOCK_PORTS: [u16; 2] = [9101, 9102];

/// Where the demo listens; the defaults are the demo config's.
#[derive(Debug, Clone)]
pub(crate) struct DemoOptions {
    /// Latency of the mock providers before their response head.
    pub latency: Duration,
    pub listen: Option<String>,
    pub admin_listen: Option<String>,
    /// Ports for the two mock providers, in place of 9101 and 9102.
    pub mock_ports: [u16; 2],
}

impl Default for DemoOptions {
    fn default() -> Self {
        DemoOptions {
            latency: Duration::from_millis(150),
            listen: None,
            admin_listen: None,
            mock_ports: MOCK_PORTS,
        }
    }
}

/// Start the mocks and the gateway, and run until SIGINT/SIGTERM.
pub(crate) fn run(options: DemoOptions) -> Result<(), String> {
    let env = |name: &str| match name {
        "COLLIE_DEMO_PROVIDER_KEY" => Some(DEMO_PROVIDER_KEY.to_string()),
        other => std::env::var(other).ok(),
    };
    let mut config = Config::from_yaml(DEMO_CONFIG, &env).map_err(|e| e.to_string())?;
    if let Some(l) = &options.listen {
        config.listen = l.parse().map_err(|e| format!("--listen {l}: {e}"))?;
    }
    if let Some(l) = &options.admin_listen {
        config.admin_listen = l.parse().map_err(|e| format!("--admin-listen {l}: {e}"))?;
    }
    for d in &mut config.deployments {
        if let Some(i) = MOCK_PORTS.iter().position(|p| *p == d.base_url.port) {
            d.base_url.set_port(options.mock_ports[i]);
        }
    }
    let latency = options.latency;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    // The mocks live on this runtime for the life of the process.
    let mocks = runtime.block_on(async {
        let mut mocks = Vec::new();
        for port in options.mock_ports {
            let listen = SocketAddr::from(([127, 0, 0, 1], port));
            let mock = MockServer::start(MockConfig {
                listen,
                tls: None,
                h2c: true,
                default: Behavior::default()
                    .delay(latency)
                    .interval(Duration::from_millis(40)),
                record: false,
                dims: 8,
            })
            .await
            .map_err(|e| format!("cannot start the mock provider on {listen}: {e}"))?;
            mocks.push(mock);
        }
        Ok::<_, String>(mocks)
    })?;
    let collie = Collie::build(config, None).map_err(|e| e.to_string())?;
    log::info!(
        "demo ready: mock providers on 127.0.0.1:{} and :{}; try\n  curl -s http://{}/v1/chat/completions -H 'X-Tenant-ID: team-a' -H 'Authorization: Bearer sk-demo-team-a' -H 'Content-Type: application/json' -d '{{\"model\":\"gpt-4o-mini\",\"messages\":[{{\"role\":\"user\",\"content\":\"Hello\"}}]}}'\nmetrics: http://{}/metrics",
        options.mock_ports[0],
        options.mock_ports[1],
        collie.listen,
        collie.admin_listen
    );
    collie.run_until_signalled();
    drop(mocks);
    drop(runtime);
    Ok(())
}
