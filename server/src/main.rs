use clap::Parser;
use server::config::{Cli, Commands, KeysCommand, UsersCommand};

/// See `mimalloc` in Cargo.toml: the server allocates per request and per batch on many threads.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    server::telemetry::init_tracing();
    let cli = Cli::parse();
    match cli.command {
        None => serve(cli.serve).await,
        Some(Commands::Serve(args)) => serve(args).await,
        Some(Commands::Migrate(db)) => server::seed::migrate(&db).await,
        Some(Commands::Seed(args)) => server::seed::run(&args).await,
        Some(Commands::Cdc(args)) => server::cli::cdc(&args).await,
        Some(Commands::Keys(KeysCommand::Create(args))) => server::cli::create_key(&args).await,
        Some(Commands::Users(UsersCommand::Create(args))) => server::cli::create_user(&args).await,
        Some(Commands::Rebuild(args)) if args.online => server::cli::rebuild_online(&args).await,
        Some(Commands::Rebuild(args)) => {
            let report = server::rebuild::run(&args.db).await?;
            println!(
                "rebuilt {} member views from {} events (up to position {}) in {:.2?} read+fold, {:.2?} write: {:.0} events/s",
                report.members, report.events, report.position, report.read_and_fold, report.write, report.events_per_second
            );
            Ok(())
        }
    }
}

async fn serve(args: server::config::ServeArgs) -> anyhow::Result<()> {
    let tally = server::build(&args).await?;
    tokio::spawn(server::shutdown_on_signal(tally.shutdown_token()));
    tally.serve().await
}
