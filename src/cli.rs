//! The command line: `refold serve`, `refold migrate`.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};

use crate::config::{Config, Settings, check_env};
use crate::{migrate, server, telemetry};

#[derive(Debug, Parser)]
#[command(
    name = "refold",
    version,
    about = "Event sourcing in the Kappa style: HTTP events into a durable log, folded into read models",
    after_help = "Every setting also comes from REFOLD_<NAME> (e.g. REFOLD_KAFKA_BROKERS) and from refold.toml \
                  (e.g. kafka_brokers = \"...\"); flags override the environment, which overrides the file."
)]
pub struct Cli {
    /// Config file [default: ./refold.toml when it exists]
    #[arg(long, global = true, env = "REFOLD_CONFIG", value_name = "PATH")]
    pub config: Option<PathBuf>,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the HTTP API on the configured log (embedded by default)
    Serve(Settings),
    /// Create or check the log's topics from migrations/, recording what was applied
    Migrate(Settings),
}

/// Entry point of the `refold` binary.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Layers file, environment and flags into a validated [`Config`].
pub fn load_config(file: Option<&Path>, flags_and_env: Settings) -> anyhow::Result<Config> {
    check_env(std::env::vars().map(|(k, _)| k), &["REFOLD_CONFIG"])?;
    let default = Path::new("refold.toml");
    let file = match file {
        Some(path) => Settings::from_file(path)?,
        None if default.exists() => Settings::from_file(default)?,
        None => Settings::default(),
    };
    Config::from_settings(flags_and_env.over(file))
}

fn run(cli: Cli) -> anyhow::Result<()> {
    let (Command::Serve(settings) | Command::Migrate(settings)) = &cli.command;
    let config = load_config(cli.config.as_deref(), settings.clone())?;
    telemetry::init(config.log_format);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        match cli.command {
            Command::Serve(_) => {
                let listener = tokio::net::TcpListener::bind(config.listen)
                    .await
                    .with_context(|| {
                        format!(
                            "cannot listen on {} (in use? pick another with --listen)",
                            config.listen
                        )
                    })?;
                server::run(&config, listener, server::shutdown_signal()).await
            }
            Command::Migrate(_) => {
                let log = server::open_log(&config)?;
                let migrations = migrate::load(&config.migrations)?;
                let report = migrate::migrate(&*log, &migrations, &config.topic_prefix).await?;
                for t in &report.topics_created {
                    println!("created topic {t}");
                }
                for m in &report.applied {
                    println!("applied {m}");
                }
                for m in &report.already {
                    println!("already applied {m}");
                }
                println!(
                    "the {} log is up to date ({} migrations)",
                    log.backend(),
                    migrations.len()
                );
                Ok(())
            }
        }
    })
}
