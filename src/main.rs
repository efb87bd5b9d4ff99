//! The `knoxgate` binary: parse the command line, load the configuration, set up logging, run.

use clap::Parser;
use knoxgate::{
    cli::{self, Cli, Command},
    config::{Config, LogFormat},
};

/// sysexits' EX_CONFIG: the configuration is wrong.
const EXIT_CONFIG: i32 = 78;

fn main() {
    let cli = Cli::parse();
    let config = match Config::load(cli.config.as_deref()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("knoxgate: {e}");
            std::process::exit(EXIT_CONFIG);
        }
    };
    let filter = tracing_subscriber::EnvFilter::new(&config.log.level);
    let subscriber = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match config.log.format {
        LogFormat::Json => subscriber.json().init(),
        LogFormat::Text => subscriber.init(),
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    let command = cli.command.unwrap_or(Command::Serve { migrate: false });
    if let Err(e) = runtime.block_on(cli::run(command, config)) {
        eprintln!("knoxgate: {e:#}");
        std::process::exit(1);
    }
}
