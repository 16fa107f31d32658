//! The "bare Pingora" arm: a passthrough proxy with no policy at all, only
//! `upstream_peer`. What any Pingora-based proxy costs on this machine.

use async_trait::async_trait;
use clap::Parser;
use pingora::prelude::*;

#[derive(Parser)]
struct Args {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:8180")]
    listen: String,
    /// Upstream host:port.
    #[arg(long, default_value = "127.0.0.1:9101")]
    upstream: String,
    /// Worker threads.
    #[arg(long, default_value_t = 1)]
    threads: usize,
}

struct Bare {
    upstream: String,
}

#[async_trait]
impl ProxyHttp for Bare {
    type CTX = ();
    fn new_ctx(&self) {}

    async fn upstream_peer(&self, _s: &mut Session, _c: &mut ()) -> Result<Box<HttpPeer>> {
        Ok(Box::new(HttpPeer::new(
            self.upstream.as_str(),
            false,
            String::new(),
        )))
    }
}

fn main() {
    env_logger::init();
    let args = Args::parse();
    let conf = pingora::server::configuration::ServerConf {
        threads: args.threads,
        ..Default::default()
    };
    let mut server = Server::new_with_opt_and_conf(None, conf);
    server.bootstrap();
    let mut proxy = http_proxy_service(
        &server.configuration,
        Bare {
            upstream: args.upstream,
        },
    );
    proxy.add_tcp(&args.listen);
    server.add_service(proxy);
    server.run_forever();
}
