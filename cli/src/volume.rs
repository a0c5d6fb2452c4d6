//! `codafs volume …`: create, list and inspect volumes.
use anyhow::Result;
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
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        client: ClientOpts,
    },
    /// Change a volume's owner, writers, quotas, write quorum or visibility (admin).
    Set(SetArgs),
    /// Show one volume.
    Info {
        name: String,
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        client: ClientOpts,
    },
}

#[derive(Args)]
pub struct CreateArgs {
    /// Volume name: 1-64 characters of a-z, 0-9, '.', '-', '_' (e.g. www.example.com).
    name: String,
    /// Account that owns the volume [default: the caller].
    #[arg(long)]
    owner: Option<String>,
    /// Byte quota (0 = unlimited).
    #[arg(long, default_value_t = 0)]
    quota_bytes: u64,
    /// File-count quota (0 = unlimited).
    #[arg(long, default_value_t = 0)]
    quota_files: u64,
    /// Durable blob copies a write needs before it is acknowledged (capped at the data replicas).
    #[arg(long, default_value_t = 2)]
    write_quorum: u32,
    /// Not readable without a token (default: public, as web content is).
    #[arg(long)]
    private: bool,
    #[command(flatten)]
    client: ClientOpts,
}

#[derive(Args)]
pub struct SetArgs {
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
    /// Byte quota (0 = unlimited).
    #[arg(long)]
    quota_bytes: Option<u64>,
    /// File-count quota (0 = unlimited).
    #[arg(long)]
    quota_files: Option<u64>,
    /// Durable blob copies a write needs.
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
                write_quorum: a.write_quorum,
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
        VolumeCmd::Info {
            name,
            json: as_json,
            client,
        } => {
            let cluster = client.cluster()?;
            let v = cluster.get_volume(&name).await?;
            if as_json {
                println!("{}", json(&v));
            } else {
                print_volume(&v);
            }
        }
    }
    Ok(())
}
