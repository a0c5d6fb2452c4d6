//! `codafs volume …`: create, list, inspect, change, delete, back up and restore volumes.
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use clap::{Args, Subcommand};
use codafs_proto::pb;

use crate::opts::ClientOpts;
use crate::output::{bytes, limit};

#[derive(Subcommand)]
pub enum VolumeCmd {
    /// Create a volume (admin). It appears at /coda/NAME on every mount.
    Create(CreateArgs),
    /// List volumes with their version stamps and usage.
    List {
        /// Print JSON instead of text (for scripts and monitoring).
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        client: ClientOpts,
    },
    /// Change a volume's owner, writers, quotas, write quorum or visibility (admin).
    Set(SetArgs),
    /// Delete a volume and everything in it (admin). Asks for its name first unless --yes;
    /// mounts drop it within seconds, and server GC frees its contents after the grace period.
    Delete {
        /// The volume to delete.
        #[arg(value_parser = volume_name)]
        name: String,
        /// Do not ask (scripts).
        #[arg(long)]
        yes: bool,
        #[command(flatten)]
        client: ClientOpts,
    },
    /// Write a volume to an archive (FILE, or - for stdout): its files, directories, links,
    /// modes, owners and times, and every content, as of one version. Restore it with
    /// `volume restore`.
    Backup(BackupArgs),
    /// Restore an archive (FILE, or - for stdin) written by `volume backup` as VOLUME. Every
    /// content is checked against its hash before anything changes; an existing volume is
    /// replaced only with --replace.
    Restore(RestoreArgs),
    /// Show one volume: version, files and bytes against quota, each server's role, repair
    /// backlog and corrupt copies, the mounts subscribed, and how many of its blobs every data
    /// server holds (this walks the whole volume; --no-copies skips it).
    Info {
        /// The volume to show.
        #[arg(value_parser = volume_name)]
        name: String,
        /// Print JSON instead of text (for scripts and monitoring).
        #[arg(long)]
        json: bool,
        /// Skip counting the copies of the volume's blobs on the data servers.
        #[arg(long)]
        no_copies: bool,
        #[command(flatten)]
        client: ClientOpts,
    },
}

/// Checks a volume name as the servers do, so a bad one gets the rule at once. It went to the
/// servers, and with them unreachable the operator saw only that no server took the call.
fn volume_name(s: &str) -> Result<String, String> {
    codafs_common::names::validate_volume_name(s)
        .map(|()| s.to_string())
        .map_err(|e| e.to_string())
}

#[derive(Args)]
pub struct CreateArgs {
    /// Volume name: 1-64 characters of a-z, 0-9, '.', '-', '_' (e.g. www.example.com).
    #[arg(value_parser = volume_name)]
    name: String,
    /// Account that owns the volume [default: the caller].
    #[arg(long)]
    owner: Option<String>,
    /// Byte quota, e.g. 500M or 20G (binary units; 0 = unlimited).
    #[arg(long, default_value = "0", value_name = "SIZE", value_parser = crate::mount::parse_size)]
    quota_bytes: u64,
    /// Quota on the number of nodes: files, directories, symlinks (0 = unlimited).
    #[arg(long, default_value_t = 0)]
    quota_files: u64,
    /// Durable blob copies a write needs before it is acknowledged. Without it: 2, or every
    /// data server when there are fewer. A value above the cluster's data servers is refused.
    #[arg(long)]
    write_quorum: Option<u32>,
    /// Not readable without a token (default: public, as web content is).
    #[arg(long)]
    private: bool,
    #[command(flatten)]
    client: ClientOpts,
}

#[derive(Args)]
pub struct BackupArgs {
    /// The volume to back up.
    #[arg(value_parser = volume_name)]
    volume: String,
    /// Archive to write; `-` writes to stdout (pipe it to compression or remote storage).
    file: PathBuf,
    /// Incremental: every node, but only the contents of files changed after this volume
    /// version (the version an earlier backup printed). Restoring it needs those older
    /// contents on the servers (restore the full backup first).
    #[arg(long, value_name = "VERSION")]
    since: Option<u64>,
    #[command(flatten)]
    client: ClientOpts,
}

#[derive(Args)]
pub struct RestoreArgs {
    /// Archive to read; `-` reads stdin.
    file: PathBuf,
    /// Volume to create (the archive's own name need not match).
    volume: String,
    /// Delete an existing volume of that name first.
    #[arg(long)]
    replace: bool,
    /// Owner of the restored volume [default: the archive's].
    #[arg(long)]
    owner: Option<String>,
    /// Directory holding contents while they are checked and sent [default: the system's
    /// temporary directory]. Needs room for the archive's contents.
    #[arg(long)]
    spool: Option<PathBuf>,
    /// Blob uploads in flight at once.
    #[arg(long, default_value_t = 16)]
    parallel: usize,
    #[command(flatten)]
    client: ClientOpts,
}

#[derive(Args)]
pub struct SetArgs {
    /// The volume to change.
    #[arg(value_parser = volume_name)]
    name: String,
    /// New owner account. A former owner who is not made a writer (and is not an admin) loses
    /// their tokens, as with --remove-writer.
    #[arg(long)]
    owner: Option<String>,
    /// Let this account write the volume too (repeatable).
    #[arg(long = "add-writer")]
    add_writers: Vec<String>,
    /// Stop letting this account write the volume (repeatable). Also ends the account's tokens on
    /// every server: it logs in again for its remaining rights.
    #[arg(long = "remove-writer")]
    remove_writers: Vec<String>,
    /// Byte quota, e.g. 500M or 20G (binary units; 0 = unlimited).
    #[arg(long, value_name = "SIZE", value_parser = crate::mount::parse_size)]
    quota_bytes: Option<u64>,
    /// Quota on the number of nodes: files, directories, symlinks (0 = unlimited).
    #[arg(long)]
    quota_files: Option<u64>,
    /// Durable blob copies a write needs (at most the cluster's data servers).
    #[arg(long)]
    write_quorum: Option<u32>,
    /// Make the volume readable without a token.
    #[arg(long, conflicts_with = "private")]
    public: bool,
    /// Make the volume readable only with a token.
    #[arg(long)]
    private: bool,
    #[command(flatten)]
    client: ClientOpts,
}

fn print_volume(v: &pb::VolumeInfo) {
    println!("volume      {}", v.name);
    println!("id          {}", v.id);
    println!("owner       {}", v.owner);
    if !v.writers.is_empty() {
        println!("writers     {}", v.writers.join(", "));
    }
    println!("version     {}", v.version);
    println!("usage       {} in {} files", bytes(v.used_bytes), v.used_files);
    println!(
        "quota       {} / {} files",
        limit(v.quota_bytes, bytes),
        limit(v.quota_files, |n| n.to_string())
    );
    println!("write quorum {}", v.write_quorum);
    println!("public read {}", v.public_read);
}

fn json(v: &pb::VolumeInfo) -> serde_json::Value {
    serde_json::json!({
        "name": v.name, "id": v.id, "owner": v.owner, "version": v.version,
        "used_bytes": v.used_bytes, "used_files": v.used_files, "quota_bytes": v.quota_bytes,
        "quota_files": v.quota_files, "write_quorum": v.write_quorum, "public_read": v.public_read,
        "root_ino": v.root_ino,
    })
}

/// One server's view of a volume: its blob health (server-wide) and its change streams of the
/// volume (the mounts subscribed through it).
struct Replica {
    addr: String,
    status: Result<pb::ServerStatus, String>,
    subscribers: Vec<pb::Subscriber>,
}

impl Replica {
    fn json(&self) -> serde_json::Value {
        let mounts: Vec<serde_json::Value> = self
            .subscribers
            .iter()
            .map(|s| serde_json::json!({"peer": s.peer, "since_ns": s.since_ns}))
            .collect();
        match &self.status {
            Ok(s) => serde_json::json!({
                "addr": self.addr, "role": s.role, "witness": s.witness,
                "repair_backlog": s.repair_backlog, "corrupt_found": s.corrupt_found,
                "subscribers": mounts,
            }),
            Err(e) => serde_json::json!({"addr": self.addr, "error": e}),
        }
    }
}

/// Every server's view (an unreachable one says why).
async fn replicas(c: &codafs_client::Cluster, volume: &str) -> Vec<Replica> {
    let Ok(servers) = c.list_servers().await else {
        return Vec::new();
    };
    let addrs: Vec<String> = servers.servers.iter().map(|s| s.addr.clone()).collect();
    let mut out = Vec::new();
    for (s, status) in servers.servers.into_iter().zip(c.status_each(&addrs).await) {
        let status = status.map_err(|e| e.to_string());
        let subscribers = c
            .get_volume_on(&s.addr, volume)
            .await
            .map(|v| v.subscribers)
            .unwrap_or_default();
        out.push(Replica {
            addr: s.addr,
            status,
            subscribers,
        });
    }
    out
}

/// E.g. `120 blobs, each on all 2 data servers` or `120 blobs: 3 missing from some data server
/// (1 below the write quorum of 2, 0 on none); could not ask 127.0.0.1:7402`.
fn copies_line(h: &codafs_client::copies::CopyHealth) -> String {
    let mut line = if h.under_replicated == 0 {
        format!("{} blobs, each on all {} data servers", h.blobs, h.data_servers)
    } else {
        format!(
            "{} blobs: {} missing from some data server ({} below the write quorum of {}, {} on none); repair copies them from the servers that hold them",
            h.blobs, h.under_replicated, h.below_quorum, h.quorum, h.lost
        )
    };
    if !h.unreachable.is_empty() {
        line.push_str(&format!(
            "; could not ask {} (counted as holding nothing)",
            h.unreachable.join(", ")
        ));
    }
    line
}

fn print_replicas(replicas: &[Replica]) {
    if replicas.is_empty() {
        return;
    }
    println!("servers     (backlog: referenced blobs the server lacks and repair will fetch; corrupt: bad copies it found since it started; both server-wide)");
    println!("  {:<24} {:<10} {:>8} {:>8}", "SERVER", "ROLE", "BACKLOG", "CORRUPT");
    for r in replicas {
        match &r.status {
            Ok(s) if s.witness => println!("  {:<24} {:<10} {:>8} {:>8}", r.addr, "witness", "-", "-"),
            Ok(s) => println!(
                "  {:<24} {:<10} {:>8} {:>8}",
                r.addr, s.role, s.repair_backlog, s.corrupt_found
            ),
            Err(e) => println!("  {:<24} unreachable: {e}", r.addr),
        }
    }
    let now = codafs_common::now_ns();
    let mounts: Vec<(&str, &pb::Subscriber)> = replicas
        .iter()
        .flat_map(|r| r.subscribers.iter().map(move |s| (r.addr.as_str(), s)))
        .collect();
    println!("mounts      {} subscribed to its changes", mounts.len());
    for (server, s) in mounts {
        let secs = (now - s.since_ns).max(0) / 1_000_000_000;
        println!("  {:<24} through {server}, for {secs} s", s.peer);
    }
}

/// Asks on the terminal for the volume's name; anything else cancels.
fn confirm_delete(v: &pb::VolumeInfo) -> Result<()> {
    use std::io::{BufRead, IsTerminal, Write};
    if !std::io::stdin().is_terminal() {
        anyhow::bail!(
            "refusing to delete volume {} without confirmation: no terminal to ask on (pass --yes)",
            v.name
        );
    }
    print!(
        "Delete volume {} and everything in it ({} files, {})? Type its name to confirm: ",
        v.name,
        v.used_files,
        bytes(v.used_bytes)
    );
    std::io::stdout().flush()?;
    let mut answer = String::new();
    std::io::stdin().lock().read_line(&mut answer)?;
    if answer.trim() != v.name {
        anyhow::bail!("not confirmed; volume {} left as it is", v.name);
    }
    Ok(())
}

pub async fn run(cmd: VolumeCmd) -> Result<()> {
    match cmd {
        VolumeCmd::Create(a) => {
            a.client.required_token()?;
            let cluster = a.client.cluster()?;
            let spec = pb::VolumeSpec {
                name: a.name,
                owner: a.owner.unwrap_or_default(),
                quota_bytes: a.quota_bytes,
                quota_files: a.quota_files,
                write_quorum: a.write_quorum.unwrap_or(0),
                public_read: !a.private,
            };
            let v = cluster.create_volume(spec).await?;
            println!("created volume {} (id {}, version {})", v.name, v.id, v.version);
        }
        VolumeCmd::Set(a) => {
            a.client.required_token()?;
            let cluster = a.client.cluster()?;
            let changes = pb::VolumeChanges {
                name: a.name,
                owner: a.owner,
                add_writers: a.add_writers,
                remove_writers: a.remove_writers,
                quota_bytes: a.quota_bytes,
                quota_files: a.quota_files,
                write_quorum: a.write_quorum,
                public_read: if a.public {
                    Some(true)
                } else if a.private {
                    Some(false)
                } else {
                    None
                },
            };
            let v = cluster.set_volume(changes).await?;
            print_volume(&v);
        }
        VolumeCmd::List { json: as_json, client } => {
            let cluster = client.cluster()?;
            let volumes = cluster.list_volumes(None).await?;
            if as_json {
                println!("{}", serde_json::Value::Array(volumes.iter().map(json).collect()));
            } else {
                println!(
                    "{:<32} {:>8} {:>12} {:>10} {:>10}",
                    "VOLUME", "OWNER", "VERSION", "FILES", "BYTES"
                );
                for v in &volumes {
                    println!(
                        "{:<32} {:>8} {:>12} {:>10} {:>10}",
                        v.name,
                        v.owner,
                        v.version,
                        v.used_files,
                        bytes(v.used_bytes)
                    );
                }
            }
        }
        VolumeCmd::Delete { name, yes, client } => {
            client.required_token()?;
            let cluster = client.cluster()?;
            let v = cluster.get_volume(&name).await?;
            if !yes {
                confirm_delete(&v)?;
            }
            cluster.delete_volume(&name).await?;
            println!(
                "deleted volume {} ({} files, {}); its contents are collected after the servers' GC grace period",
                v.name,
                v.used_files,
                bytes(v.used_bytes)
            );
        }
        VolumeCmd::Backup(a) => backup(a).await?,
        VolumeCmd::Restore(a) => restore(a).await?,
        VolumeCmd::Info {
            name,
            json: as_json,
            no_copies,
            client,
        } => {
            let cluster = client.cluster()?;
            let v = cluster.get_volume(&name).await?;
            let replicas = replicas(&cluster, &name).await;
            let copies = if no_copies {
                None
            } else {
                Some(
                    codafs_client::copies::check(&cluster, &name, v.write_quorum)
                        .await
                        .context("counting the copies of the volume's blobs (--no-copies skips it)")?,
                )
            };
            if as_json {
                let mut j = json(&v);
                j["replicas"] = serde_json::Value::Array(replicas.iter().map(Replica::json).collect());
                if let Some(h) = &copies {
                    j["copies"] = serde_json::json!({
                        "blobs": h.blobs, "data_servers": h.data_servers, "quorum": h.quorum,
                        "under_replicated": h.under_replicated, "below_quorum": h.below_quorum,
                        "lost": h.lost, "unreachable": h.unreachable,
                    });
                }
                println!("{j}");
            } else {
                print_volume(&v);
                print_replicas(&replicas);
                if let Some(h) = &copies {
                    println!("copies      {}", copies_line(h));
                }
            }
        }
    }
    Ok(())
}

/// `volume backup`: to a temporary file renamed into place once complete (no half archive
/// under the final name), or to stdout.
async fn backup(a: BackupArgs) -> Result<()> {
    a.client.required_token()?;
    let c = a.client.cluster()?;
    let bar = crate::upload::Bar::new();
    let s = if a.file == Path::new("-") {
        let out = std::io::BufWriter::new(std::io::stdout());
        codafs_client::backup::backup(&c, &a.volume, a.since, out, &bar)
            .await?
            .0
    } else {
        let tmp = a.file.with_extension("partial");
        let f = std::fs::File::create(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
        let result = codafs_client::backup::backup(&c, &a.volume, a.since, std::io::BufWriter::new(f), &bar).await;
        let (s, out) = match result {
            Ok(r) => r,
            Err(e) => {
                let _ = std::fs::remove_file(&tmp);
                return Err(e.into());
            }
        };
        out.into_inner()
            .map_err(|e| e.into_error())
            .and_then(|f| f.sync_all())
            .with_context(|| format!("writing {}", tmp.display()))?;
        std::fs::rename(&tmp, &a.file).with_context(|| format!("renaming {} into place", tmp.display()))?;
        s
    };
    bar.0.finish_and_clear();
    eprintln!(
        "backed up volume {} at version {}{}: {} nodes, {} contents ({})",
        a.volume,
        s.version,
        a.since
            .map(|v| format!(" (contents changed after version {v})"))
            .unwrap_or_default(),
        s.nodes,
        s.contents,
        bytes(s.content_bytes)
    );
    Ok(())
}

/// `volume restore`.
async fn restore(a: RestoreArgs) -> Result<()> {
    a.client.required_token()?;
    let c = a.client.cluster()?;
    let spool = match &a.spool {
        Some(d) => tempfile::tempdir_in(d),
        None => tempfile::tempdir(),
    }
    .context("creating the spool directory")?;
    let opts = codafs_client::backup::RestoreOptions {
        replace: a.replace,
        owner: a.owner.clone(),
        spool: spool.path().join("contents"),
        parallel: a.parallel,
    };
    let bar = crate::upload::Bar::new();
    let s = if a.file == Path::new("-") {
        codafs_client::backup::restore(&c, std::io::stdin(), &a.volume, &opts, &bar).await?
    } else {
        let f = std::fs::File::open(&a.file).with_context(|| format!("opening {}", a.file.display()))?;
        codafs_client::backup::restore(&c, std::io::BufReader::new(f), &a.volume, &opts, &bar).await?
    };
    bar.0.finish_and_clear();
    println!(
        "restored volume {}: {} nodes, {} contents ({}); volume version {}",
        a.volume,
        s.nodes,
        s.contents,
        bytes(s.content_bytes),
        s.version
    );
    Ok(())
}
