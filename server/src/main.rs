use clap::Parser;
use server::config::{Cli, Commands};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    server::telemetry::init_tracing();
    let cli = Cli::parse();
    match cli.command {
        None => serve(cli.serve).await,
        Some(Commands::Serve(args)) => serve(args).await,
        Some(Commands::Migrate(db)) => server::seed::migrate(&db).await,
        Some(Commands::Seed(args)) => server::seed::run(&args).await,
    }
}

async fn serve(args: server::config::ServeArgs) -> anyhow::Result<()> {
    let tally = server::build(&args).await?;
    tokio::spawn(server::shutdown_on_signal(tally.shutdown_token()));
    tally.serve().await
}
