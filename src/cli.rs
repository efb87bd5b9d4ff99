//! The command line: `serve` (the default), `migrate`, `check-config`, and operator commands
//! for users and tokens.

use std::{io::BufRead, path::PathBuf, sync::Arc};

use clap::{Args, Parser, Subcommand};
use time::OffsetDateTime;

use crate::{
    app,
    auth::{TokenRow, UserInfo, generate_token, token_key_of},
    config::Config,
    metrics::Metrics,
    password, schema,
    store::{
        Store,
        postgres::{self, NewToken, NewUser, Postgres},
    },
};

/// knoxgate: forward-auth for django-rest-knox tokens.
#[derive(Debug, Parser)]
#[command(version, about)]
pub struct Cli {
    /// TOML configuration file (every key can also be set by a KNOXGATE_* variable).
    #[arg(long, global = true, env = "KNOXGATE_CONFIG")]
    pub config: Option<PathBuf>,
    #[command(subcommand)]
    pub command: Option<Command>,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Serve /verify, the session endpoints and the admin listener (the default).
    Serve {
        /// First create the tables if absent and install the change-feed triggers
        /// (what `knoxgate migrate` does).
        #[arg(long)]
        migrate: bool,
    },
    /// Create the Django-compatible tables when absent (existing tables are never altered) and
    /// install the change-feed triggers.
    Migrate {
        /// Only create missing tables; do not install the triggers.
        #[arg(long, conflicts_with = "uninstall_triggers")]
        no_triggers: bool,
        /// Remove the triggers, their functions and the revocation log.
        #[arg(long)]
        uninstall_triggers: bool,
    },
    /// Validate the configuration and exit.
    CheckConfig,
    /// Manage users (Django-format password hashes).
    #[command(subcommand)]
    User(UserCommand),
    /// Manage knox tokens.
    #[command(subcommand)]
    Token(TokenCommand),
}

#[derive(Debug, Args)]
pub struct PasswordArg {
    /// Read the password from the first line of standard input.
    #[arg(long, conflicts_with = "password")]
    pub password_stdin: bool,
    /// The password (visible to other local users through the process list; prefer --password-stdin).
    #[arg(long)]
    pub password: Option<String>,
}

#[derive(Debug, Subcommand)]
pub enum UserCommand {
    /// Create a user with a pbkdf2_sha256 password hash.
    Create {
        username: String,
        #[command(flatten)]
        password: PasswordArg,
        #[arg(long, default_value = "")]
        email: String,
        #[arg(long)]
        superuser: bool,
        #[arg(long)]
        inactive: bool,
    },
    /// Replace a user's password.
    SetPassword {
        username: String,
        #[command(flatten)]
        password: PasswordArg,
    },
    /// Deactivate a user: their tokens stop verifying.
    Deactivate { username: String },
    /// Reactivate a user.
    Activate { username: String },
}

#[derive(Debug, Subcommand)]
pub enum TokenCommand {
    /// Create a token for a user and print it (as login would, without a password).
    Create {
        #[arg(long)]
        user: String,
    },
    /// Revoke a token (read from standard input when not given).
    Revoke {
        token: Option<String>,
        /// Revoke every token of that token's user.
        #[arg(long)]
        all: bool,
    },
}

fn read_password(arg: &PasswordArg) -> anyhow::Result<String> {
    if let Some(p) = &arg.password {
        return Ok(p.clone());
    }
    if arg.password_stdin {
        let mut line = String::new();
        std::io::stdin().lock().read_line(&mut line)?;
        return Ok(line.trim_end_matches(['\r', '\n']).to_owned());
    }
    anyhow::bail!("give the password with --password-stdin (or --password)")
}

fn offline_store(config: &Config) -> anyhow::Result<Arc<Store>> {
    Ok(Arc::new(Store::connect(config, Arc::new(Metrics::new()))?))
}

/// Runs `migrate` and prints what it did.
pub async fn migrate(config: &Config, triggers: bool) -> anyhow::Result<()> {
    let mut client = postgres::connect_one(&config.postgres).await?;
    let report = schema::migrate(&mut client, &config.postgres, triggers).await?;
    for t in &report.created_tables {
        println!("created table {t}");
    }
    if report.created_tables.is_empty() {
        println!("tables present; left unchanged");
    }
    if report.installed_triggers {
        println!("change-feed triggers installed");
    }
    Ok(())
}

/// Waits for SIGTERM or SIGINT.
async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("SIGTERM handler");
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}

/// Executes a parsed command line with a loaded configuration.
pub async fn run(command: Command, config: Config) -> anyhow::Result<()> {
    match command {
        Command::CheckConfig => {
            println!("configuration is valid");
            Ok(())
        }
        Command::Serve {
            migrate: do_migrate,
        } => {
            if do_migrate {
                migrate(&config, true).await?;
            }
            let running = app::start(config).await?;
            shutdown_signal().await;
            tracing::info!("shutting down: draining in-flight requests");
            running.shutdown().await;
            tracing::info!("stopped");
            Ok(())
        }
        Command::Migrate {
            no_triggers,
            uninstall_triggers,
        } => {
            if uninstall_triggers {
                let mut client = postgres::connect_one(&config.postgres).await?;
                schema::uninstall_triggers(&mut client, &config.postgres).await?;
                println!("change-feed triggers removed");
                return Ok(());
            }
            migrate(&config, !no_triggers).await
        }
        Command::User(cmd) => {
            let pg = Postgres::new(&config.postgres, Arc::new(Metrics::new()))?;
            let iterations = config.sessions.password_iterations;
            match cmd {
                UserCommand::Create {
                    username,
                    password,
                    email,
                    superuser,
                    inactive,
                } => {
                    let pw = read_password(&password)?;
                    let encoded = tokio::task::spawn_blocking(move || {
                        password::make_password(&pw, iterations)
                    })
                    .await?;
                    let id = pg
                        .create_user(&NewUser {
                            username: &username,
                            encoded_password: &encoded,
                            email: &email,
                            superuser,
                            active: !inactive,
                        })
                        .await?;
                    println!("created user {username} (id {id})");
                }
                UserCommand::SetPassword { username, password } => {
                    let pw = read_password(&password)?;
                    let encoded = tokio::task::spawn_blocking(move || {
                        password::make_password(&pw, iterations)
                    })
                    .await?;
                    if pg.login_user(&username).await?.is_none() {
                        anyhow::bail!("no user named {username}");
                    }
                    pg.set_password(&username, &encoded).await?;
                    println!("password of {username} replaced");
                }
                UserCommand::Deactivate { username } | UserCommand::Activate { username }
                    if false =>
                {
                    let _ = username;
                }
                UserCommand::Deactivate { username } => {
                    anyhow::ensure!(
                        pg.set_active(&username, false).await?,
                        "no user named {username}"
                    );
                    println!("user {username} deactivated");
                }
                UserCommand::Activate { username } => {
                    anyhow::ensure!(
                        pg.set_active(&username, true).await?,
                        "no user named {username}"
                    );
                    println!("user {username} activated");
                }
            }
            Ok(())
        }
        Command::Token(cmd) => {
            let store = offline_store(&config)?;
            let knox = &config.knox;
            match cmd {
                TokenCommand::Create { user } => {
                    let Some(u) = store.postgres().login_user(&user).await? else {
                        anyhow::bail!("no user named {user}");
                    };
                    let token = generate_token(&knox.token_prefix, knox.token_character_length);
                    let digest = knox.hash_algorithm.digest(token.as_bytes());
                    let now = OffsetDateTime::now_utc();
                    let expiry = knox.token_ttl.map(|ttl| now + ttl);
                    let new = NewToken {
                        username: &user,
                        digest: &digest.to_hex(),
                        token_key: token_key_of(&token),
                        created: now,
                        expiry,
                        limit: knox.token_limit_per_user,
                    };
                    let Some(user_id) = store.postgres().create_token(&new).await? else {
                        anyhow::bail!("{user} already holds the maximum number of tokens");
                    };
                    store
                        .remember_new(TokenRow {
                            digest: digest.into(),
                            token_key: token_key_of(&token).into(),
                            user_id: user_id.into(),
                            created: now,
                            expiry,
                            user: UserInfo {
                                is_active: u.is_active,
                                username: user.into(),
                                email: u.email.into(),
                            },
                        })
                        .await;
                    println!("{token}");
                }
                TokenCommand::Revoke { token, all } => {
                    let token = match token {
                        Some(t) => t,
                        None => {
                            let mut line = String::new();
                            std::io::stdin().lock().read_line(&mut line)?;
                            line.trim().to_owned()
                        }
                    };
                    let digest = knox.hash_algorithm.hex_digest(token.as_bytes());
                    let Some(row) = store.postgres().confirm(&digest).await? else {
                        anyhow::bail!("no such token");
                    };
                    if all {
                        store.logout_all(&row.digest, &row.user_id).await?;
                        println!("revoked every token of user {}", row.user_id);
                    } else {
                        store.logout(&row.digest).await?;
                        println!("token revoked");
                    }
                }
            }
            if let Some(redis) = store.redis() {
                redis.quit().await;
            }
            Ok(())
        }
    }
}
