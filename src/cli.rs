//! The command line: `serve` (the default), `migrate`, `check-config`, and operator commands
//! for users and tokens.

use std::{io::BufRead, path::PathBuf, sync::Arc};

use clap::{Args, Parser, Subcommand};
use time::OffsetDateTime;

use crate::{
    app,
    config::{Config, UserColumns},
    login,
    metrics::Metrics,
    password,
    store::{NewUser, NotCreated, Store, pg, postgres::Postgres, schema},
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
        /// Print the trigger SQL (or, with --uninstall-triggers, the removal SQL) for the
        /// configured tables instead of running it; connects to nothing.
        #[arg(long, conflicts_with = "no_triggers")]
        print_sql: bool,
    },
    /// Relay the change feed to Redis for instances with cache.feed = "redis": hold the
    /// Postgres LISTEN connection, replay the revocation log, append every change to the
    /// stream. Run two or more; they need no coordination. Serves only the admin listener.
    Relay,
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

/// The password given, refusing a blank one as Django's `createsuperuser` does ("Blank
/// passwords aren't allowed."): an empty standard input (a script's unset variable) must not
/// become an account anyone can log in to.
fn read_password(arg: &PasswordArg) -> anyhow::Result<String> {
    let password = if let Some(p) = &arg.password {
        p.clone()
    } else if arg.password_stdin {
        let mut line = String::new();
        if std::io::stdin().lock().read_line(&mut line)? == 0 {
            anyhow::bail!("no password on standard input (it was empty)");
        }
        line.trim_end_matches(['\r', '\n']).to_owned()
    } else {
        anyhow::bail!("give the password with --password-stdin (or --password)")
    };
    // Django's test: `password.strip() == ""`.
    anyhow::ensure!(
        !password.trim().is_empty(),
        "blank passwords are not allowed"
    );
    Ok(password)
}

/// Runs `migrate` and prints what it did.
pub async fn migrate(config: &Config, triggers: bool) -> anyhow::Result<()> {
    let mut client = pg::connect_one(&config.postgres).await?;
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

/// Executes a parsed command line with a loaded configuration.
pub async fn run(command: Command, config: Config) -> anyhow::Result<()> {
    match command {
        Command::CheckConfig => {
            println!("configuration is valid");
            Ok(())
        }
        Command::Serve { migrate: first } => serve(config, first).await,
        Command::Relay => relay(config).await,
        Command::Migrate {
            no_triggers,
            uninstall_triggers,
            print_sql,
        } => {
            if print_sql {
                print_trigger_sql(&config, uninstall_triggers);
                Ok(())
            } else if uninstall_triggers {
                let mut client = pg::connect_one(&config.postgres).await?;
                schema::uninstall_triggers(&mut client, &config.postgres).await?;
                println!("change-feed triggers removed");
                Ok(())
            } else {
                migrate(&config, !no_triggers).await
            }
        }
        Command::User(cmd) => user(cmd, &settled(config).await).await,
        Command::Token(cmd) => token(cmd, &settled(config).await).await,
    }
}

/// `config` with `postgres.pgbouncer` decided as `serve` decides it (probing `postgres.url`
/// when the key is unset): the operator commands use the pool URL, and behind PgBouncer that
/// means no startup options and no named statements.
async fn settled(mut config: Config) -> Config {
    let pooler = pg::probe_pooler(&config.postgres).await;
    pg::settle_pgbouncer(&mut config.postgres, pooler);
    config
}

/// Serves until SIGTERM or SIGINT, then drains.
async fn serve(config: Config, migrate_first: bool) -> anyhow::Result<()> {
    if migrate_first {
        migrate(&config, true).await?;
    }
    let running = app::start(config).await?;
    app::shutdown_signal().await;
    tracing::info!("shutting down: draining in-flight requests");
    running.shutdown().await;
    tracing::info!("stopped");
    Ok(())
}

/// Relays until SIGTERM or SIGINT.
async fn relay(config: Config) -> anyhow::Result<()> {
    let running = app::start_relay(config).await?;
    app::shutdown_signal().await;
    tracing::info!("relay shutting down");
    running.shutdown().await;
    tracing::info!("stopped");
    Ok(())
}

/// Prints the trigger SQL that `migrate` would run (or the removal SQL).
fn print_trigger_sql(config: &Config, uninstall: bool) {
    let sql = if uninstall {
        schema::uninstall_triggers_sql(&config.postgres)
    } else {
        schema::install_triggers_sql(&config.postgres)
    };
    println!("{sql}");
}

/// Reads the password an operator gives and hashes it as Django would, off the runtime.
async fn hashed_password(arg: &PasswordArg, config: &Config) -> anyhow::Result<String> {
    let pw = read_password(arg)?;
    let iterations = config.sessions.password_iterations;
    Ok(tokio::task::spawn_blocking(move || password::make_password(&pw, iterations)).await?)
}

async fn user(cmd: UserCommand, config: &Config) -> anyhow::Result<()> {
    let pg = Postgres::new(&config.postgres, Arc::new(Metrics::new()))?;
    match cmd {
        UserCommand::Create {
            username,
            password,
            email,
            superuser,
            inactive,
        } => {
            // The insert names the columns of Django's own user table.
            anyhow::ensure!(
                config.postgres.user_columns == UserColumns::default(),
                "`user create` writes Django's default user table only; with a custom user model \
                 (postgres.user_columns), create users with Django (manage.py createsuperuser)"
            );
            let encoded = hashed_password(&password, config).await?;
            if pg.login_user(&username).await?.is_some() {
                anyhow::bail!("a user named {username} already exists");
            }
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
            let encoded = hashed_password(&password, config).await?;
            if pg.login_user(&username).await?.is_none() {
                anyhow::bail!("no user named {username}");
            }
            pg.set_password(&username, &encoded).await?;
            println!("password of {username} replaced");
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

async fn token(cmd: TokenCommand, config: &Config) -> anyhow::Result<()> {
    // The whole store, so that what a command changes reaches Redis as well as Postgres.
    let store = Arc::new(Store::connect(config, Arc::new(Metrics::new()))?);
    let result = match cmd {
        TokenCommand::Create { user } => create_token(&store, config, &user).await,
        TokenCommand::Revoke { token, all } => revoke_token(&store, config, token, all).await,
    };
    // A creation that failed leaves work behind: the delete of a token whose COMMIT went
    // unanswered (tried at once, then, the process stopping, at every transaction deadline
    // while that transaction runs), or the cancel of a statement (bounded by the connect
    // timeout) and a ROLLBACK. What is still running at this deadline is logged and left.
    let pg = &config.postgres;
    let work_done =
        tokio::time::Instant::now() + pg.login_transaction_deadline() * 3 + pg.connect_timeout;
    store.postgres().finish_login_work(work_done).await;
    if let Some(redis) = store.redis() {
        redis.quit().await;
    }
    result
}

async fn create_token(store: &Arc<Store>, config: &Config, username: &str) -> anyhow::Result<()> {
    let now = OffsetDateTime::now_utc();
    // Checked first for a clearer message; the insert finds the user by name again.
    match store.postgres().login_user(username).await? {
        None => anyhow::bail!("no user named {username}"),
        // Login refuses an inactive user, and /verify would refuse the token.
        Some(user) if !user.is_active => anyhow::bail!("{username} is inactive"),
        Some(_) => {}
    }
    let issued = match login::issue_token(store, &config.knox, username, now).await? {
        Ok(issued) => issued,
        Err(NotCreated::LimitReached) => {
            anyhow::bail!("{username} already holds the maximum number of tokens")
        }
        Err(NotCreated::NoSuchUser) => anyhow::bail!("no user named {username}"),
    };
    // Cached in Redis and the user's expired tokens deleted before the process exits.
    let _ = issued.settled.await;
    println!("{}", issued.token);
    Ok(())
}

async fn revoke_token(
    store: &Store,
    config: &Config,
    token: Option<String>,
    all: bool,
) -> anyhow::Result<()> {
    let token = match token {
        Some(t) => t,
        None => {
            let mut line = String::new();
            std::io::stdin().lock().read_line(&mut line)?;
            line.trim().to_owned()
        }
    };
    let digest = config.knox.hash_algorithm.hex_digest(token.as_bytes());
    let Some(row) = store.postgres().confirm(&digest).await? else {
        anyhow::bail!("no such token");
    };
    let existed = if all {
        store
            .logout_all(&row.token_key, &row.digest, &row.user_id)
            .await?
    } else {
        store.logout(&row.token_key, &row.digest).await?
    };
    if all {
        // Deleted by someone else between the lookup and the delete: the user's other tokens
        // were not found through it, so nothing was revoked.
        anyhow::ensure!(
            existed,
            "the token was deleted meanwhile; no other token of its user was revoked"
        );
        println!("revoked every token of user {}", row.user_id);
    } else {
        println!("token revoked");
    }
    Ok(())
}
