//! Process assembly: the Pingora server with the gateway listener, the admin
//! listener and the background work, run until a signal — or, in tests and
//! the demo, a handle — stops it.

use crate::admin::AdminApp;
use crate::alerts::Alerts;
use crate::alerts::health::HealthAlerts;
use crate::audit::{AuditError, AuditHandle};
use crate::config::{Config, ConfigErrors};
pub use crate::gateway::Policy;
use crate::gateway::{Gateway, InFlight};
use crate::lifecycle::Lifecycle;
use crate::listener::{HeadLimits, Listener, ListenerPolicy, Refusal};
use crate::metrics::Metrics;
use crate::quota::fleet::{Fleet, ProviderAsk};
use crate::quota::rebalance::Rebalancer;
use crate::routing::DNS_REFRESH;
use crate::routing::health::HealthBook;
use crate::state::State;
use async_trait::async_trait;
use pingora::apps::HttpServerOptions;
use pingora::server::configuration::ServerConf;
use pingora::server::{RunArgs, Server, ShutdownSignal, ShutdownSignalWatch, ShutdownWatch};
use pingora::services::background::{BackgroundService, background_service};
use pingora::services::listening::Service;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

/// Why the process could not start. Each kind asks for a different answer
/// from whoever runs it: fix the file, wait for a dependency, report a bug.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The config file is invalid (only from [`Collie::load`]: a validated
    /// config is not refused by [`Collie::build`]).
    #[error("{} is invalid:\n{errors}", path.display())]
    Config {
        /// The config file.
        path: PathBuf,
        /// Every problem found in it.
        errors: ConfigErrors,
    },
    /// Something outside the process that a start needs is not there: the
    /// audit database or file, a listen port.
    #[error("{what} is unavailable: {source}")]
    Unavailable {
        /// What is missing (`the audit trail`, `listen address …`).
        what: String,
        /// Why it is unavailable.
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// A fault of Collie's own.
    #[error("internal error: {what}: {source}")]
    Internal {
        /// The part that failed (`routing`, `the server thread`…).
        what: &'static str,
        /// The error it met.
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

/// `EX_USAGE` from sysexits.h: the configuration or the command line is wrong.
pub const EX_USAGE: u8 = 64;
/// `EX_UNAVAILABLE`: something the process needs is not there (the audit
/// database, a listen port); a restart later may succeed.
pub const EX_UNAVAILABLE: u8 = 69;
/// `EX_SOFTWARE`: a fault of Collie's own.
pub const EX_SOFTWARE: u8 = 70;

impl StartError {
    /// The exit status that tells whoever runs the process which answer
    /// this error asks for.
    pub fn exit_code(&self) -> u8 {
        match self {
            StartError::Config { .. } => EX_USAGE,
            StartError::Unavailable { .. } => EX_UNAVAILABLE,
            StartError::Internal { .. } => EX_SOFTWARE,
        }
    }

    fn unavailable(
        what: impl Into<String>,
        source: impl Into<Box<dyn std::error::Error + Send + Sync>>,
    ) -> StartError {
        StartError::Unavailable {
            what: what.into(),
            source: source.into(),
        }
    }

    fn internal(
        what: &'static str,
        source: impl Into<Box<dyn std::error::Error + Send + Sync>>,
    ) -> StartError {
        StartError::Internal {
            what,
            source: source.into(),
        }
    }
}

/// A configured, not yet running process.
pub struct Collie {
    pub(crate) state: Arc<State>,
    /// The gateway listener's address, from the config.
    pub listen: SocketAddr,
    /// The admin listener's address, from the config.
    pub admin_listen: SocketAddr,
    server: Server,
    audit: Option<AuditHandle>,
    alerts: Arc<Alerts>,
    drain: DrainParts,
    /// Added to the server when it runs, so that [`Collie::watch_config`]
    /// can still change it.
    reloader: Option<Reloader>,
    /// `/readyz` fails until the gateway listener accepts connections.
    gateway_accepting: Arc<AtomicBool>,
}

/// What a graceful stop acts on.
#[derive(Clone)]
struct DrainParts {
    in_flight: InFlight,
    lifecycle: Lifecycle,
    state: Arc<State>,
}

/// After the cut, how long the stop waits for cut requests to be settled.
const CUT_GRACE: Duration = Duration::from_secs(5);

/// The live config's head limits for every new connection; refusals counted.
struct ConnPolicy {
    state: Arc<State>,
    refusals: prometheus::IntCounterVec,
}

impl ListenerPolicy for ConnPolicy {
    fn limits(&self) -> HeadLimits {
        let c = &self.state.load().config;
        HeadLimits {
            head_timeout: c.head_timeout,
            idle_timeout: c.keepalive_timeout,
            max_bytes: c.max_header_bytes,
            max_headers: c.max_headers,
        }
    }

    fn refused(&self, why: Refusal) {
        self.refusals.with_label_values(&[why.label()]).inc();
    }
}

impl Collie {
    /// Read and validate a config file and build from it; SIGHUP reloads
    /// the file.
    pub fn load(path: &Path) -> Result<Collie, StartError> {
        Collie::load_with(path, Policy::Full)
    }

    /// [`Collie::load`] with the policy chosen (see [`Collie::build_with`]).
    pub fn load_with(path: &Path, policy: Policy) -> Result<Collie, StartError> {
        let config = Config::load(path).map_err(|errors| StartError::Config {
            path: path.to_path_buf(),
            errors,
        })?;
        Collie::build_with(config, Some(path.to_path_buf()), policy)
    }

    /// Build every service from a validated config. `config_path` enables
    /// reloading that file on SIGHUP. What a validated config says is not
    /// refused here; what can fail is the outside world (a port taken, the
    /// audit sink down) or Collie itself.
    pub fn build(config: Config, config_path: Option<PathBuf>) -> Result<Collie, StartError> {
        Collie::build_with(config, config_path, Policy::Full)
    }

    /// [`Collie::build`] with the policy chosen: [`Policy::TransportOnly`]
    /// is for benchmarks (and refused unless the gateway listens on a
    /// loopback address).
    pub fn build_with(
        config: Config,
        config_path: Option<PathBuf>,
        policy: Policy,
    ) -> Result<Collie, StartError> {
        if policy == Policy::TransportOnly && !config.listen.ip().is_loopback() {
            return Err(StartError::unavailable(
                format!("a gateway without its policy on {}", config.listen),
                "only a loopback address may serve without the policy",
            ));
        }
        let (listen, admin_listen) = (config.listen, config.admin_listen);
        for addr in [listen, admin_listen] {
            check_bindable(addr)?;
        }
        let conf = ServerConf {
            threads: config.threads,
            // A graceful stop first waits for the requests in flight (see
            // `Drain`); the grace period after that is for a request that
            // arrived on a kept-alive connection in the same instant. The
            // runtime shutdown that follows drops unfinished tasks (its
            // timeout only covers blocking threads), so the waiting must
            // happen before it.
            grace_period_seconds: Some(1),
            graceful_shutdown_timeout_seconds: Some(1),
            upstream_keepalive_pool_size: config.upstream_keepalive_pool,
            ..ServerConf::default()
        };
        let mut server = Server::new_with_opt_and_conf(None, conf);
        server.bootstrap();

        let metrics = Arc::new(Metrics::new().map_err(|e| StartError::internal("metrics", e))?);
        let book = HealthBook::new(metrics.health.clone(), 64);
        let fleet = match &config.fleet {
            Some(f) => Some(
                Fleet::new(f.clone(), &metrics.registry)
                    .map_err(|e| StartError::internal("fleet", e))?,
            ),
            None => None,
        };
        let state = Arc::new(
            State::new(config, Arc::clone(&book), fleet.clone())
                .map_err(|e| StartError::internal("routing", e))?,
        );
        let audit_metrics = crate::audit::AuditMetrics::new(&metrics.registry)
            .map_err(|e| StartError::internal("metrics", e))?;
        let alert_metrics = crate::alerts::AlertMetrics::new(&metrics.registry)
            .map_err(|e| StartError::internal("metrics", e))?;
        let audit_settings = state.load().config.audit.clone();
        let sidecar = crate::audit::sidecar_id(&audit_settings);
        let alerts = Arc::new(Alerts::new(
            &sidecar,
            audit_settings.anomalies.cooldown,
            audit_settings.anomalies.webhook.clone(),
            audit_settings.sink.is_some(),
            alert_metrics,
        ));
        let started =
            crate::audit::start(&audit_settings, audit_metrics, sidecar, Arc::clone(&alerts));
        let (auditor, audit) = match started {
            Ok(Some((a, h))) => (Some(a), Some(h)),
            Ok(None) => (None, None),
            Err(AuditError::Sink(e)) => return Err(StartError::unavailable("the audit trail", e)),
            Err(e @ AuditError::Thread(_)) => return Err(StartError::internal("audit", e)),
        };
        let lifecycle = Lifecycle::default();
        let gateway_accepting = Arc::new(AtomicBool::new(false));
        let gateway = Gateway::new(
            Arc::clone(&state),
            Arc::clone(&metrics),
            auditor,
            lifecycle.clone(),
            policy,
        );
        let in_flight = gateway.in_flight.clone();
        let bodies = Arc::clone(&gateway.bodies);
        let server_conf = Arc::clone(&server.configuration);
        let mut proxy = pingora::proxy::http_proxy(&server_conf, gateway);
        let mut options = HttpServerOptions::default();
        // Clients on the same host may speak HTTP/2 without TLS.
        options.h2c = true;
        let snap = state.load();
        options.h2_idle_timeout = Some(snap.config.keepalive_timeout);
        proxy.server_options = Some(options);
        let mut h2 = pingora::protocols::http::v2::server::default_h2_options();
        h2.max_header_list_size(u32::try_from(snap.config.max_header_bytes).unwrap_or(u32::MAX));
        proxy.h2_options = Some(h2);
        let policy = || ConnPolicy {
            state: Arc::clone(&state),
            refusals: metrics.connection_refusals.clone(),
        };
        let mut gateway_service = Service::new(
            "collie gateway".to_string(),
            Listener::new(proxy, policy(), lifecycle.draining.clone()),
        );
        gateway_service.add_tcp(&listen.to_string());
        server.add_service(gateway_service);

        let mut admin = Service::new(
            "collie admin".to_string(),
            Listener::new(
                AdminApp {
                    metrics: Arc::clone(&metrics),
                    state: Arc::clone(&state),
                    draining: lifecycle.draining.clone(),
                    gateway_accepting: Arc::clone(&gateway_accepting),
                    bodies,
                    alerts: Arc::clone(&alerts),
                    subscribers: Default::default(),
                },
                policy(),
                lifecycle.draining.clone(),
            ),
        );
        admin.add_tcp(&admin_listen.to_string());
        admin.threads = Some(1);
        server.add_service(admin);

        server.add_service(background_service(
            "health alerts",
            HealthAlerts {
                state: Arc::clone(&state),
                alerts: Arc::clone(&alerts),
                events: std::sync::Mutex::new(book.take_events()),
            },
        ));
        server.add_service(background_service("health probes", Probes { book }));
        server.add_service(background_service(
            "quota rebalance",
            RebalanceService {
                state: Arc::clone(&state),
                metrics: Arc::clone(&metrics),
                rebalancer: Rebalancer::default(),
            },
        ));

        if let Some(fleet) = fleet {
            server.add_service(background_service(
                "fleet leases",
                FleetService {
                    state: Arc::clone(&state),
                    fleet,
                },
            ));
        }

        server.add_service(background_service(
            "dns refresh",
            DnsRefresh {
                state: Arc::clone(&state),
            },
        ));

        let reloader = config_path.map(|path| Reloader {
            // What was loaded, near enough: the file as it is now.
            seen: std::fs::read(&path).ok(),
            path,
            state: Arc::clone(&state),
            metrics: Arc::clone(&metrics),
            poll: None,
        });
        Ok(Collie {
            gateway_accepting,
            reloader,
            listen,
            admin_listen,
            drain: DrainParts {
                in_flight,
                lifecycle,
                state: Arc::clone(&state),
            },
            state,
            server,
            audit,
            alerts,
        })
    }

    /// Also reload the config file when its content changes, checked every
    /// `every` (a Kubernetes ConfigMap volume is updated in place by the
    /// kubelet; nobody sends a signal). Without a config file, nothing.
    pub fn watch_config(&mut self, every: Duration) {
        if let Some(r) = &mut self.reloader {
            // A zero interval would spin.
            r.poll = Some(every.max(Duration::from_millis(100)));
        }
    }

    fn add_reloader(&mut self) {
        if let Some(r) = self.reloader.take() {
            self.server
                .add_service(background_service("config reload", r));
        }
    }

    /// Run until SIGTERM (graceful) or SIGINT (fast). Exits the process
    /// with 69 if the gateway listener never accepts connections (see
    /// [`GatewayCheck`]).
    pub fn run_until_signalled(mut self) {
        self.add_reloader();
        self.server.add_service(background_service(
            "gateway check",
            GatewayCheck {
                listen: self.listen,
                admin_listen: self.admin_listen,
                accepting: Arc::clone(&self.gateway_accepting),
            },
        ));
        self.server.run(RunArgs {
            shutdown_signal: Box::new(Drain {
                signal: UnixSignals,
                parts: self.drain,
            }),
        });
        // The server is gone with every request it held: write the rest,
        // then give the webhook its last alerts.
        if let Some(a) = self.audit {
            a.join();
        }
        self.alerts.shutdown();
    }

    /// Run on a thread of its own until the returned handle is dropped or
    /// stopped. Waits until the gateway accepts connections.
    pub fn spawn(mut self) -> Result<Running, StartError> {
        self.add_reloader();
        let (tx, rx) = tokio::sync::watch::channel(None);
        let listen = self.listen;
        let admin_listen = self.admin_listen;
        let state = Arc::clone(&self.state);
        let server = self.server;
        let audit = self.audit;
        let alerts = self.alerts;
        let parts = self.drain;
        let gateway_accepting = self.gateway_accepting;
        let thread = std::thread::Builder::new()
            .name("collie".into())
            .spawn(move || {
                server.run(RunArgs {
                    shutdown_signal: Box::new(Drain {
                        signal: HandleSignal(rx),
                        parts,
                    }),
                });
                if let Some(a) = audit {
                    a.join();
                }
                alerts.shutdown();
            })
            .map_err(|e| StartError::internal("the server thread", e))?;
        let running = Running {
            listen,
            admin_listen,
            state,
            stop: tx,
            thread: Some(thread),
        };
        for addr in [listen, admin_listen] {
            wait_until_accepting(addr)
                .map_err(|e| StartError::unavailable(format!("listen address {addr}"), e))?;
        }
        gateway_accepting.store(true, Ordering::Release);
        Ok(running)
    }
}

/// Pingora binds the listeners later, in a thread of their own, where a
/// failure cannot reach the caller (it retries a port in use for half a
/// minute, then that thread panics). Binding once here turns the common
/// case (a port taken, an address not on this host) into an error at start;
/// a port taken in the instant between is still caught only there.
fn check_bindable(addr: SocketAddr) -> Result<(), StartError> {
    std::net::TcpListener::bind(addr)
        .map(drop)
        .map_err(|e| StartError::unavailable(format!("listen address {addr}"), e))
}

/// Where to connect to reach a listener on `addr`: an unspecified address
/// (`0.0.0.0`, `[::]`) is reached through loopback.
fn reachable(addr: SocketAddr) -> SocketAddr {
    let mut a = addr;
    if a.ip().is_unspecified() {
        a.set_ip(match a {
            SocketAddr::V4(_) => std::net::Ipv4Addr::LOCALHOST.into(),
            SocketAddr::V6(_) => std::net::Ipv6Addr::LOCALHOST.into(),
        });
    }
    a
}

/// How long the gateway listener may take to accept connections before the
/// process gives up: Pingora retries a bind that fails for about 30 s.
const LISTEN_PATIENCE: Duration = Duration::from_secs(40);

/// Watches for the gateway listener to accept connections: until then
/// `/readyz` fails; then "listening" is logged; if it never does (its port
/// taken in the instant after [`check_bindable`], and Pingora's listener
/// thread gave up), the process exits with 69 rather than run, ready-looking,
/// without its gateway. A connection that another process on the port
/// accepts is not told apart; `check_bindable` makes that case rare.
struct GatewayCheck {
    listen: SocketAddr,
    admin_listen: SocketAddr,
    accepting: Arc<AtomicBool>,
}

#[async_trait]
impl BackgroundService for GatewayCheck {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let started = Instant::now();
        let target = reachable(self.listen);
        loop {
            let attempt = tokio::time::timeout(
                Duration::from_millis(200),
                tokio::net::TcpStream::connect(target),
            );
            tokio::select! {
                r = attempt => if matches!(r, Ok(Ok(_))) {
                    self.accepting.store(true, Ordering::Release);
                    log::info!(
                        "collie listening on {} (admin on {})",
                        self.listen,
                        self.admin_listen
                    );
                    return;
                },
                _ = shutdown.changed() => return,
            }
            if started.elapsed() > LISTEN_PATIENCE {
                log::error!(
                    "cannot start: the gateway listener on {} did not accept connections within {LISTEN_PATIENCE:?} (is its port taken?)",
                    self.listen
                );
                std::process::exit(69);
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

/// The last connect error when nothing accepts on `addr` within ~10 s.
fn wait_until_accepting(addr: SocketAddr) -> std::io::Result<()> {
    let addr = reachable(addr);
    let mut last = None;
    for _ in 0..1000 {
        match std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(100)) {
            Ok(_) => return Ok(()),
            Err(e) => last = Some(e),
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    Err(last.unwrap_or_else(|| std::io::ErrorKind::TimedOut.into()))
}

/// A gateway running on its own thread.
pub struct Running {
    /// The gateway listener's address, accepting connections.
    pub listen: SocketAddr,
    /// The admin listener's address, accepting connections.
    pub admin_listen: SocketAddr,
    /// The live config, quota ledger and health the gateway runs with.
    pub state: Arc<State>,
    /// `Some(true)` asks for a graceful stop, `Some(false)` for a fast one.
    stop: tokio::sync::watch::Sender<Option<bool>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Running {
    /// Stop the way SIGTERM does (graceful) or SIGINT does (fast) and wait.
    pub fn stop(mut self, graceful: bool) {
        self.shutdown(graceful);
    }

    fn shutdown(&mut self, graceful: bool) {
        let _ = self.stop.send(Some(graceful));
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.shutdown(false);
    }
}

/// A graceful stop: at once `/readyz` fails, idle client connections are
/// closed and every answer carries `Connection: close`; then it waits until
/// no request is in flight (at most the config's `drain_timeout`) before the
/// server stops accepting and shuts down. Requests still running then are
/// cut off through [`Lifecycle::cut`] — a stream ends with an error event —
/// and get a few seconds to be settled and recorded: Pingora's own grace
/// period is a fixed sleep, and what is still running after it is dropped
/// without reaching the logging phase, i.e. without settlement or an audit
/// record. New requests are still served while the stop waits; in a pod
/// they are the application's last ones.
struct Drain<S> {
    signal: S,
    parts: DrainParts,
}

impl DrainParts {
    /// Wait until nothing is in flight or `limit` passed; whether it emptied.
    async fn settled_within(&self, limit: Duration) -> bool {
        let started = Instant::now();
        while self.in_flight.count() > 0 {
            if started.elapsed() >= limit {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        true
    }
}

#[async_trait]
impl<S: ShutdownSignalWatch + Send + Sync> ShutdownSignalWatch for Drain<S> {
    async fn recv(&self) -> ShutdownSignal {
        let signal = self.signal.recv().await;
        if !matches!(signal, ShutdownSignal::GracefulTerminate) {
            return signal;
        }
        let p = &self.parts;
        p.lifecycle.draining.cancel();
        let limit = p.state.load().config.drain_timeout;
        let waiting = p.in_flight.count();
        if waiting > 0 {
            log::info!("graceful stop: waiting up to {limit:?} for {waiting} requests in flight");
        }
        if !p.settled_within(limit).await {
            log::warn!(
                "graceful stop: {} requests still in flight after {limit:?}; cutting them off",
                p.in_flight.count()
            );
            p.lifecycle.cut.cancel();
            if !p.settled_within(CUT_GRACE).await {
                log::warn!(
                    "graceful stop: {} requests did not end after the cut; dropped unrecorded",
                    p.in_flight.count()
                );
            }
        }
        signal
    }
}

/// SIGTERM: graceful stop; SIGINT: fast stop; SIGQUIT as SIGTERM (Collie has
/// no socket hand-over to a new process).
struct UnixSignals;

#[async_trait]
impl ShutdownSignalWatch for UnixSignals {
    async fn recv(&self) -> ShutdownSignal {
        use tokio::signal::unix::{SignalKind, signal};
        let (Ok(mut term), Ok(mut int), Ok(mut quit)) = (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
            signal(SignalKind::quit()),
        ) else {
            log::error!("cannot install signal handlers; stopping");
            return ShutdownSignal::FastShutdown;
        };
        tokio::select! {
            _ = term.recv() => ShutdownSignal::GracefulTerminate,
            _ = quit.recv() => ShutdownSignal::GracefulTerminate,
            _ = int.recv() => ShutdownSignal::FastShutdown,
        }
    }
}

struct HandleSignal(tokio::sync::watch::Receiver<Option<bool>>);

#[async_trait]
impl ShutdownSignalWatch for HandleSignal {
    async fn recv(&self) -> ShutdownSignal {
        let mut rx = self.0.clone();
        loop {
            match *rx.borrow_and_update() {
                Some(true) => return ShutdownSignal::GracefulTerminate,
                Some(false) => return ShutdownSignal::FastShutdown,
                None => {}
            }
            if rx.changed().await.is_err() {
                return ShutdownSignal::FastShutdown;
            }
        }
    }
}

/// The fleet's side of every tenant's quota: once per lease interval,
/// report use and refresh shares; in between, answer top-ups; on stop,
/// give the leases back.
struct FleetService {
    state: Arc<State>,
    fleet: Arc<Fleet>,
}

#[async_trait]
impl BackgroundService for FleetService {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let Some(mut inbox) = self.fleet.take_inbox() else {
            return;
        };
        let interval = self.fleet.settings().interval;
        let mut tick = tokio::time::interval(interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut providers_answered = Instant::now();
        loop {
            tokio::select! {
                _ = tick.tick() => {
                    let snap = self.state.load();
                    self.fleet
                        .refresh(snap.quota.ledgers(), snap.quota.calendar(), false)
                        .await;
                    if self.share_providers(&snap.router).await {
                        providers_answered = Instant::now();
                    } else if providers_answered.elapsed() >= self.fleet.settings().ttl {
                        // The provider shares ran out without an answer: each
                        // sidecar takes its part of each key's rates.
                        let n = u64::from(self.fleet.settings().expected_replicas.max(1));
                        for d in &snap.router.deployments {
                            if let Some(l) = &d.limiter {
                                let u = l.take_use();
                                let part = |r: Option<u64>| r.map(|r| (r / n, r / n));
                                l.set_share(part(u.rpm), part(u.tpm));
                            }
                        }
                    }
                    self.share_holds(&snap.router).await;
                }
                Some(req) = inbox.recv() => {
                    let snap = self.state.load();
                    self.fleet.answer_all(req, &mut inbox, snap.quota.calendar()).await;
                }
                _ = shutdown.changed() => {
                    // Requests still draining settle into the ledger; what
                    // they use after this is reported by nobody and counts
                    // as leased (their leases expire, counted as used).
                    let snap = self.state.load();
                    self.fleet
                        .refresh(snap.quota.ledgers(), snap.quota.calendar(), true)
                        .await;
                    return;
                }
            }
        }
    }
}

impl FleetService {
    /// Report the demand on every provider key with limits and apply this
    /// sidecar's new shares of them. Whether Redis answered.
    async fn share_providers(&self, router: &crate::routing::Router) -> bool {
        let limited: Vec<_> = router
            .deployments
            .iter()
            .filter_map(|d| d.limiter.as_ref().map(|l| (d, l)))
            .collect();
        if limited.is_empty() {
            return true;
        }
        let asks: Vec<ProviderAsk> = limited
            .iter()
            .map(|(d, l)| {
                let u = l.take_use();
                ProviderAsk {
                    deployment: d.id.clone(),
                    rpm: u.rpm,
                    tpm: u.tpm,
                    requests: u.requests,
                    tokens: u.tokens,
                }
            })
            .collect();
        match self.fleet.sync_providers(&asks).await {
            Ok(shares) => {
                for ((_, l), s) in limited.iter().zip(shares) {
                    l.set_share(s.rpm, s.tpm);
                }
                true
            }
            Err(e) => {
                log::warn!("fleet: provider key shares: {e}");
                false
            }
        }
    }

    /// Tell the fleet which deployments this sidecar keeps off (a provider's
    /// `Retry-After`, an open breaker) and keep off the ones the others do.
    async fn share_holds(&self, router: &crate::routing::Router) {
        let now = crate::routing::now_ms();
        let mine: Vec<(String, Duration)> = router
            .deployments
            .iter()
            .filter_map(|d| {
                let blocked = d.blocked_for_ms(now).map(Duration::from_millis);
                let open = d.health.would_admit().err().flatten();
                blocked.max(open).map(|w| (d.id.clone(), w))
            })
            .collect();
        match self.fleet.sync_holds(&mine).await {
            Ok(holds) => {
                for (id, wait) in holds {
                    if let Some(d) = router.deployment_by_id(&id) {
                        d.block_for(wait);
                    }
                }
            }
            Err(e) => log::warn!("fleet: shared holds: {e}"),
        }
    }
}

/// Once per interval: lends idle tenants' rate capacity to busy high-priority
/// ones while a pool is saturated, and publishes pool and loan state as
/// metrics.
struct RebalanceService {
    state: Arc<State>,
    metrics: Arc<Metrics>,
    rebalancer: Rebalancer,
}

#[async_trait]
impl BackgroundService for RebalanceService {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let mut last = Instant::now();
        loop {
            let interval = self.state.load().config.quota.rebalance.interval;
            tokio::select! {
                _ = tokio::time::sleep(interval) => {}
                _ = shutdown.changed() => return,
            }
            let snap = self.state.load();
            let threshold = snap.config.quota.rebalance.threshold;
            let busy: Vec<bool> = snap
                .router
                .pools
                .iter()
                .map(|p| {
                    let load = p.gate.load();
                    self.metrics.quota.publish_pool(&p.id, &load);
                    load.utilisation().is_some_and(|u| u >= threshold)
                })
                .collect();
            // In a fleet a sidecar holds only its share of each rate:
            // lending it on would add to it (config refuses asking for both).
            if self.state.fleet.is_some() {
                last = Instant::now();
                continue;
            }
            let changes =
                self.rebalancer
                    .step(&snap.config, snap.quota.ledgers(), &busy, last.elapsed());
            for c in changes {
                log::info!(
                    "quota rebalance: {} {} (rpm {:+.1} → {:+.1}, tpm {:+.0} → {:+.0})",
                    c.tenant,
                    c.event(),
                    c.before.rpm,
                    c.after.rpm,
                    c.before.tpm,
                    c.after.tpm
                );
                self.metrics.quota.publish_loan(&c);
            }
            last = Instant::now();
        }
    }
}

/// Runs passes over the shared health registry. A pass only starts the
/// probes that are due (each in a task of its own) and returns at once, so
/// the loop wakes when the next probe of the current deployments is due —
/// a reload that shortens an interval or adds a deployment wakes it too.
struct Probes {
    book: Arc<HealthBook>,
}

#[async_trait]
impl BackgroundService for Probes {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        loop {
            self.book.registry.run_health_check(false).await;
            // At least every second, so a missed wake-up costs little; at
            // most every 10 ms, so a storm of them costs little too.
            let wait = self
                .book
                .next_due()
                .unwrap_or(Duration::from_secs(1))
                .clamp(Duration::from_millis(10), Duration::from_secs(1));
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = self.book.wake.notified() => {}
                _ = shutdown.changed() => return,
            }
        }
    }
}

/// Resolves deployments' host names again every [`DNS_REFRESH`], so a
/// provider that moves to new addresses is followed without a reload.
struct DnsRefresh {
    state: Arc<State>,
}

#[async_trait]
impl BackgroundService for DnsRefresh {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        loop {
            tokio::select! {
                _ = tokio::time::sleep(DNS_REFRESH) => {}
                _ = shutdown.changed() => return,
            }
            let snap = self.state.load();
            for u in &snap.router.deployments {
                match u.refresh_address().await {
                    Ok(Some(addr)) => log::info!("deployment {} moved to {addr}", u.id),
                    Ok(None) => {}
                    // The old address stays in use; probes and breakers
                    // judge whether it still works.
                    Err(e) => log::warn!("deployment {}: {e}", u.id),
                }
            }
        }
    }
}

/// Reloads the config file on SIGHUP and, when watching, when its content
/// changes. A file that fails validation is reported (log and
/// `collie_config_reloads_total{result="failure"}`) and the running config
/// stays; a watched file is not tried again until it changes again.
struct Reloader {
    path: PathBuf,
    state: Arc<State>,
    metrics: Arc<Metrics>,
    /// How often to compare the file with `seen`; `None`: on SIGHUP only.
    poll: Option<Duration>,
    /// The file's content when it was last loaded or tried. Whole, not a
    /// digest: a config is small and is read whole anyway.
    seen: Option<Vec<u8>>,
}

#[async_trait]
impl BackgroundService for Reloader {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let mut hup = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
            Ok(s) => s,
            Err(e) => {
                log::warn!("config reload on SIGHUP unavailable: {e}");
                return;
            }
        };
        let mut seen = self.seen.clone();
        loop {
            let tick = async {
                match self.poll {
                    Some(every) => tokio::time::sleep(every).await,
                    None => std::future::pending().await,
                }
            };
            let signalled = tokio::select! {
                _ = hup.recv() => true,
                _ = tick => false,
                _ = shutdown.changed() => return,
            };
            // A file that cannot be read now is not a change (a ConfigMap
            // update swaps a symlink, atomically); SIGHUP reports it.
            let now = tokio::fs::read(&self.path).await.ok();
            if !signalled {
                if now.is_none() || now == seen {
                    continue;
                }
                log::info!("{} changed; reloading", self.path.display());
            }
            seen = now;
            // Reading the file and resolving deployments' host names
            // block: off the async workers, so a slow DNS server cannot
            // stall the requests they serve.
            let (state, path) = (Arc::clone(&self.state), self.path.clone());
            let outcome = tokio::task::spawn_blocking(move || state.reload_file(&path)).await;
            match outcome {
                Ok(Ok(())) => {
                    self.metrics.config.reloaded();
                    log::info!("reloaded {}", self.path.display());
                }
                Ok(Err(e)) => {
                    self.metrics.config.reload_failed();
                    log::error!("kept the running config; {e}");
                }
                Err(e) => {
                    self.metrics.config.reload_failed();
                    log::error!("kept the running config; the reload did not finish: {e}");
                }
            }
        }
    }
}
