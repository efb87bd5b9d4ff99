//! The `knoxgate` binary: parse the command line, load the configuration, set up logging, run.

use clap::Parser;
use knoxgate::{
    cli::{self, Cli, Command},
    config::Config,
    telemetry,
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
    let telemetry = match telemetry::init(&config) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("knoxgate: {e}");
            std::process::exit(EXIT_CONFIG);
        }
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(config.server.worker_threads.get())
        .enable_all()
        .build()
        .expect("tokio runtime");
    let command = cli.command.unwrap_or(Command::Serve { migrate: false });
    let result = runtime.block_on(cli::run(command, config));
    telemetry.shutdown();
    if let Err(e) = result {
        eprintln!("knoxgate: {e:#}");
        std::process::exit(1);
    }
}
