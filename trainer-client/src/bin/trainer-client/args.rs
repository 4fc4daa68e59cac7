//! Flags shared by `stream` and `train`: how to reach the loaders, and what to stream. The plan
//! flags are optional so that a resumed run can tell a flag the user gave (which must agree with
//! the cursor) from a default.

use std::{
    num::NonZeroUsize,
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::{Context, bail};
use clap::Args;
use trainer_client::{
    AuthToken, ConnectOptions, Cursor, Loaders, PlanSettings, RunSpec, Shuffle, StreamOptions, TlsOptions,
};

/// How the client proves who it is and checks who the loaders are.
#[derive(Debug, Clone, Default, Args)]
pub(crate) struct SecurityArgs {
    /// PEM CA certificate that signs the loaders' certificates; turns TLS on for every loader
    /// (as an https:// loader address does, which otherwise trusts the system's roots).
    #[arg(long, env = "TRAINER_TLS_CA")]
    pub tls_ca: Option<PathBuf>,
    /// PEM client certificate for loaders that require mutual TLS (with --tls-key).
    #[arg(long, env = "TRAINER_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key of --tls-cert.
    #[arg(long, env = "TRAINER_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// Name the loaders' certificates carry, when it differs from the host in --loader (for
    /// example when loaders are given by IP address).
    #[arg(long, env = "TRAINER_TLS_DOMAIN")]
    pub tls_domain: Option<String>,
    /// File whose first line is the token sent to loaders started with --auth-token-file;
    /// without it, $CONVEYOR_AUTH_TOKEN is used when set.
    #[arg(long, env = "TRAINER_AUTH_TOKEN_FILE")]
    pub auth_token_file: Option<PathBuf>,
}

impl SecurityArgs {
    /// Adds TLS settings and the token to `options`.
    ///
    /// # Errors
    /// A file that cannot be read or holds no usable token, named.
    pub(crate) fn apply(&self, options: &mut ConnectOptions) -> anyhow::Result<()> {
        if self.tls_ca.is_some() || self.tls_cert.is_some() || self.tls_domain.is_some() {
            let mut tls =
                TlsOptions::from_files(self.tls_ca.as_deref(), self.tls_cert.as_deref(), self.tls_key.as_deref())?;
            tls.domain = self.tls_domain.clone();
            options.tls = Some(tls);
        }
        options.auth_token = match &self.auth_token_file {
            Some(path) => Some(AuthToken::from_file(path)?),
            None => AuthToken::from_env()?,
        };
        Ok(())
    }

    /// Transport settings with these credentials.
    ///
    /// # Errors
    /// See [`SecurityArgs::apply`].
    pub(crate) fn connect_options(&self) -> anyhow::Result<ConnectOptions> {
        let mut options = ConnectOptions::default();
        self.apply(&mut options)?;
        Ok(options)
    }
}

/// Connection and flow-control flags.
#[derive(Debug, Clone, Args)]
pub(crate) struct LoaderArgs {
    /// Loader address (host:port, http://host:port, or https://host:port for TLS; unix:PATH for a
    /// loader's --listen-unix socket on this host, where batches travel through shared memory,
    /// and unix:DIR/ for every socket in a directory that several replicas share).
    /// Repeat for several replicas; a name that resolves to several addresses is one replica per
    /// address.
    #[arg(long = "loader", env = "TRAINER_LOADER", value_delimiter = ',', required = true)]
    pub loaders: Vec<String>,
    /// Batches requested ahead of the training loop, over all replicas and across epoch
    /// boundaries. Client memory is about (prefetch + 2) x batch bytes.
    #[arg(long, env = "TRAINER_PREFETCH", default_value = "8")]
    pub prefetch: NonZeroUsize,
    /// Largest message accepted from a loader; bounds one batch's size.
    #[arg(long, env = "TRAINER_MAX_MESSAGE_BYTES", default_value_t = conveyor_proto::DEFAULT_MAX_MESSAGE_BYTES, value_parser = conveyor_proto::parse_bytes::<usize>)]
    pub max_message_bytes: usize,
    /// A replica that leaves a request unanswered this long is dropped and retried (30s, 500ms,
    /// or seconds).
    #[arg(long, env = "TRAINER_REQUEST_TIMEOUT", default_value = "30s", value_parser = conveyor_proto::parse_duration)]
    pub request_timeout: Duration,
    /// Fail when no replica is reachable for this long.
    #[arg(long, env = "TRAINER_UNAVAILABLE_TIMEOUT", default_value = "60s", value_parser = conveyor_proto::parse_duration)]
    pub unavailable_timeout: Duration,
    /// Ask again for a batch the storage fails transiently (a loader's object store times out
    /// or answers 5xx, after the loader's own retries) for this long before the run fails.
    #[arg(long, env = "TRAINER_STORAGE_RETRY_TIMEOUT", default_value = "120s", value_parser = conveyor_proto::parse_duration)]
    pub storage_retry_timeout: Duration,
    /// Largest shared-memory region mapped per loader on this host (a unix: loader, or a TCP
    /// one whose socket the client finds; the loader may grant less). The client's mapped
    /// shared memory is at most this times those loaders; 0, or CONVEYOR_SHM=0 in the
    /// environment, sends every batch over the socket or TCP instead.
    #[arg(long, env = "TRAINER_SHM_BYTES", default_value_t = 256 << 20, value_parser = conveyor_proto::parse_bytes::<u64>)]
    pub shm_bytes: u64,
    /// Re-resolve loader names this often.
    #[arg(long, env = "TRAINER_RESOLVE_INTERVAL", default_value = "3s", value_parser = conveyor_proto::parse_duration)]
    pub resolve_interval: Duration,
    /// TLS and token.
    #[command(flatten)]
    pub security: SecurityArgs,
}

impl LoaderArgs {
    /// The defaults for these loaders.
    pub(crate) fn new(loaders: Vec<String>) -> LoaderArgs {
        let defaults = StreamOptions::default();
        LoaderArgs {
            loaders,
            prefetch: defaults.prefetch,
            max_message_bytes: defaults.connect.max_message_bytes,
            request_timeout: defaults.request_timeout,
            unavailable_timeout: Duration::from_secs(30),
            storage_retry_timeout: defaults.storage_retry_timeout,
            resolve_interval: defaults.resolve_interval,
            shm_bytes: defaults.connect.shm_bytes,
            security: SecurityArgs::default(),
        }
    }

    /// The library's settings.
    ///
    /// # Errors
    /// A TLS or token file that cannot be used.
    pub(crate) fn options(&self) -> anyhow::Result<StreamOptions> {
        let shm_bytes = if trainer_client::shm::enabled_by_env() { self.shm_bytes } else { 0 };
        let mut connect =
            ConnectOptions { max_message_bytes: self.max_message_bytes, shm_bytes, ..ConnectOptions::default() };
        self.security.apply(&mut connect)?;
        Ok(StreamOptions {
            connect,
            prefetch: self.prefetch,
            request_timeout: self.request_timeout,
            unavailable_timeout: self.unavailable_timeout,
            storage_retry_timeout: self.storage_retry_timeout,
            resolve_interval: self.resolve_interval,
            ..StreamOptions::default()
        })
    }
}

/// What to stream. Unset flags take the defaults of [`PlanSettings`], or a resumed cursor's.
#[derive(Debug, Clone, Default, Args)]
pub(crate) struct PlanArgs {
    /// Dataset to stream.
    #[arg(long, env = "TRAINER_DATASET")]
    pub dataset: Option<String>,
    /// Samples per batch [default: 256].
    #[arg(long, env = "TRAINER_BATCH_SIZE")]
    pub batch_size: Option<u64>,
    /// Sample order within an epoch: none, full or block [default: full].
    #[arg(long, env = "TRAINER_SHUFFLE", value_parser = parse_shuffle)]
    pub shuffle: Option<Shuffle>,
    /// Blocks of chunks shuffled together with `--shuffle block`: larger mixes more, and needs
    /// that many decoded chunks in the loader's cache [default: 8].
    #[arg(long, env = "TRAINER_SHUFFLE_WINDOW")]
    pub shuffle_window: Option<u64>,
    /// Shuffle seed [default: 0].
    #[arg(long, env = "TRAINER_SEED")]
    pub seed: Option<u64>,
    /// First epoch [default: 0].
    #[arg(long, env = "TRAINER_EPOCH")]
    pub epoch: Option<u64>,
    /// Number of epochs [default: 1; 2 for train]. A resumed run keeps the cursor's end.
    #[arg(long, env = "TRAINER_EPOCHS")]
    pub epochs: Option<u64>,
    /// This process's rank in data-parallel training [default: 0].
    #[arg(long, env = "TRAINER_RANK")]
    pub rank: Option<u64>,
    /// Number of data-parallel ranks [default: 1].
    #[arg(long, env = "TRAINER_WORLD_SIZE")]
    pub world_size: Option<u64>,
    /// Drop samples that do not fill a whole batch (and an even share across ranks).
    #[arg(long, env = "TRAINER_DROP_LAST", num_args = 0..=1, default_missing_value = "true")]
    pub drop_last: Option<bool>,
}

fn parse_shuffle(text: &str) -> Result<Shuffle, String> {
    text.parse()
}

impl PlanArgs {
    /// `dataset` in batches of `batch_size`, other settings at their defaults.
    pub(crate) fn dataset(dataset: &str, batch_size: u64) -> PlanArgs {
        PlanArgs { dataset: Some(dataset.to_owned()), batch_size: Some(batch_size), ..PlanArgs::default() }
    }

    fn settings(&self) -> PlanSettings {
        let defaults = PlanSettings::default();
        PlanSettings {
            batch_size: self.batch_size.unwrap_or(defaults.batch_size),
            shuffle: self.shuffle.unwrap_or(defaults.shuffle),
            seed: self.seed.unwrap_or(defaults.seed),
            shuffle_window: self.shuffle_window.unwrap_or(defaults.shuffle_window),
            rank: self.rank.unwrap_or(defaults.rank),
            world_size: self.world_size.unwrap_or(defaults.world_size),
            drop_last: self.drop_last.unwrap_or(defaults.drop_last),
        }
    }

    /// The run these flags ask for: a new one, or the rest of the one `resume` (loaded from
    /// `resume_path`) was saved in.
    ///
    /// # Errors
    /// A missing `--dataset`, a plan the loaders cannot serve, or a flag that disagrees with the
    /// cursor (naming both values).
    pub(crate) fn run_spec(
        &self,
        loaders: &Loaders,
        default_epochs: u64,
        resume: Option<(&Cursor, &Path)>,
    ) -> anyhow::Result<RunSpec> {
        let Some((cursor, path)) = resume else {
            let dataset = self.dataset.as_deref().context("--dataset is required (or --resume-from a cursor)")?;
            let plan = loaders.plan(dataset, &self.settings())?;
            let first = self.epoch.unwrap_or(0);
            return Ok(RunSpec::new(dataset, plan, first..first + self.epochs.unwrap_or(default_epochs)));
        };
        // Another world size resumes the rest of the cursor's epoch split among the new ranks.
        let resharded;
        let cursor = match self.world_size.filter(|&world| world != cursor.plan.world_size) {
            Some(world) => {
                let rank =
                    self.rank.context("--world-size differs from the cursor's: give this process's --rank too")?;
                let plan = cursor.plan.resharded(cursor.epoch, cursor.next_batch, rank, world)?;
                resharded = Cursor { plan, next_batch: 0, ..cursor.clone() };
                &resharded
            }
            None => cursor,
        };
        let plan = &cursor.plan;
        let given: [(&str, Option<String>, String); 8] = [
            ("--dataset", self.dataset.clone(), cursor.dataset.clone()),
            ("--batch-size", self.batch_size.map(|v| v.to_string()), plan.batch_size.to_string()),
            ("--shuffle", self.shuffle.map(|v| v.to_string()), plan.shuffle.to_string()),
            ("--shuffle-window", self.shuffle_window.map(|v| v.to_string()), plan.shuffle_window.to_string()),
            ("--seed", self.seed.map(|v| v.to_string()), plan.seed.to_string()),
            ("--rank", self.rank.map(|v| v.to_string()), plan.rank.to_string()),
            ("--world-size", self.world_size.map(|v| v.to_string()), plan.world_size.to_string()),
            ("--drop-last", self.drop_last.map(|v| v.to_string()), plan.drop_last.to_string()),
        ];
        for (flag, value, saved) in given {
            if let Some(value) = value.filter(|v| *v != saved) {
                bail!(
                    "{flag} {value} conflicts with the cursor {} ({flag} {saved}); drop the flag to resume that run, \
                     or leave out --resume-from to start a new one",
                    path.display()
                );
            }
        }
        let mut spec = RunSpec::resume(cursor, self.epochs.unwrap_or(default_epochs));
        if self.epoch.is_some() || (self.epochs.is_some() && cursor.end_epoch.is_some()) {
            let end = self.epoch.unwrap_or(0) + self.epochs.unwrap_or(default_epochs);
            if end != spec.epochs.end {
                eprintln!(
                    "note: the run in {} ends before epoch {}; streaming until epoch {end} as --epoch/--epochs say",
                    path.display(),
                    spec.epochs.end
                );
                spec.epochs.end = end;
            }
        }
        Ok(spec)
    }
}
