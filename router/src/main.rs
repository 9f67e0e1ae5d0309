//! `onehead-router`: the public gRPC API in front of the workers (not built yet; see issue 5).

use clap::Parser;

#[derive(Parser)]
#[command(name = "onehead-router", version, about = "onehead's router: the public gRPC API in front of the workers")]
struct Cli {
    /// Address to serve the public API on.
    #[arg(long, env = "ONEHEAD_LISTEN", default_value = "127.0.0.1:8080")]
    listen: String,
    /// A worker's URL; repeatable.
    #[arg(long = "worker", env = "ONEHEAD_WORKERS", value_delimiter = ',')]
    workers: Vec<String>,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    anyhow::bail!(
        "the router is not implemented yet (would listen on {} for {} workers); use `onehead-worker generate`",
        cli.listen,
        cli.workers.len()
    )
}
