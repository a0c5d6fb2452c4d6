//! `codafs upload LOCALDIR VOLUME[:PATH]`: publish a tree atomically.
use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Args;
use codafs_client::upload::{upload, Progress, UploadOptions};

use crate::opts::ClientOpts;
use crate::output::bytes;

#[derive(Args)]
pub struct UploadArgs {
    /// Local directory to publish.
    local: PathBuf,
    /// Target: VOLUME or VOLUME:PATH (a subtree, created if missing).
    target: String,
    /// Also remove what exists in the target but not locally.
    #[arg(long)]
    delete: bool,
    /// Show what would change and how much would be sent (asking the data replicas which blobs
    /// they lack; everything, if they cannot be asked); upload and commit nothing.
    #[arg(long)]
    dry_run: bool,
    /// Blob uploads in flight at once.
    #[arg(long, default_value_t = 16)]
    parallel: usize,
    #[command(flatten)]
    client: ClientOpts,
}

/// A progress bar on stderr (drawn only on a terminal) for uploads, backups and restores.
pub(crate) struct Bar(pub(crate) indicatif::ProgressBar);

impl Bar {
    pub(crate) fn new() -> Bar {
        let bar = indicatif::ProgressBar::new(0);
        bar.set_style(
            indicatif::ProgressStyle::with_template("{bar:40} {bytes}/{total_bytes} {binary_bytes_per_sec} {msg}")
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        Bar(bar)
    }
}

impl Progress for Bar {
    fn planned(&self, blobs: usize, total: u64) {
        self.0.set_length(total);
        self.0.set_message(format!("{blobs} new blobs"));
    }
    fn uploaded(&self, n: u64) {
        self.0.inc(n);
    }
}

pub async fn run(a: UploadArgs) -> Result<()> {
    let (volume, path) = a
        .target
        .split_once(':')
        .map_or((a.target.as_str(), ""), |(v, p)| (v, p));
    codafs_common::names::validate_volume_name(volume).context("target volume")?;
    if !a.local.is_dir() {
        anyhow::bail!("{} is not a directory", a.local.display());
    }
    a.client.required_token()?;
    let c = a.client.cluster()?;
    let bar = Bar::new();
    let opts = UploadOptions {
        volume: volume.to_string(),
        path: path.to_string(),
        delete: a.delete,
        dry_run: a.dry_run,
        parallel: a.parallel,
    };
    let s = upload(&c, &a.local, &opts, &bar).await?;
    bar.0.finish_and_clear();
    if s.skipped > 0 {
        eprintln!(
            "note: skipped {} sockets, FIFOs or devices (not web content; remote entries of their names are left as they are)",
            s.skipped
        );
    }
    let changes = format!(
        "+{} created, ~{} updated, -{} removed, {} unchanged",
        s.created, s.updated, s.removed, s.unchanged
    );
    if a.dry_run {
        println!(
            "dry run: {changes}; would send {} blobs ({})",
            s.uploaded_blobs,
            bytes(s.uploaded_bytes)
        );
    } else if s.version == 0 {
        println!(
            "nothing to do: {} files ({}) already published",
            s.files,
            bytes(s.bytes)
        );
    } else {
        println!(
            "published {} files ({}) to {}: {changes}; sent {} blobs ({}); volume version {}",
            s.files,
            bytes(s.bytes),
            a.target,
            s.uploaded_blobs,
            bytes(s.uploaded_bytes),
            s.version
        );
    }
    Ok(())
}
