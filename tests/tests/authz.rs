//! The servers are the trust boundary: every RPC of every service is called, against a real TLS
//! cluster, by callers holding different credentials, and each answer is compared with the
//! documented one (docs/SECURITY.md). Only reads of public volumes succeed without a token.
use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use codafs_client::transport::BlobRef;
use codafs_client::{ops, Cluster};
use codafs_common::Hash;
use codafs_proto::pb;
use codafs_tests::{bounded, read_file, wait_until, ClusterOpts, Mount, TestCluster};
use tonic::Code;

/// What the probes read and write.
struct Fixture {
    /// A file of the public volume `pub`, with its attributes as its reader saw them.
    pub_file: pb::Attr,
    /// A file of the private volume `priv` (owner alice), as alice saw it.
    priv_file: pb::Attr,
    priv_root: u64,
}

/// Runs `f` on the first server through `c` and reduces the outcome to a status code.
async fn code<T, F, Fut>(c: &Cluster, f: F) -> Outcome
where
    F: FnOnce(tonic::transport::Channel) -> Fut,
    Fut: std::future::Future<Output = Result<T, tonic::Status>>,
{
    let addr = c.servers()[0].clone();
    match c.call_on(&addr, f).await {
        Ok(_) => Outcome(Code::Ok, String::new()),
        Err(e) => Outcome(e.code(), e.to_string()),
    }
}

/// A call's status code, and its message for the report when it is not the documented one.
struct Outcome(Code, String);

fn blob_get(blob: &BlobRef, ticket: bool, ino: bool) -> pb::GetBlobRequest {
    let mut r = blob.request(0);
    if !ticket {
        r.ticket = Default::default();
    }
    if !ino {
        r.ino = 0;
    }
    r
}

/// Reads a whole blob stream (errors may come with the first message).
async fn drain(mut s: tonic::Streaming<pb::BlobChunk>) -> Result<(), tonic::Status> {
    while s.message().await?.is_some() {}
    Ok(())
}

/// Calls every RPC of every service once as `c`'s holder; returns each call's status code.
async fn probe(c: &Cluster, fx: &Fixture) -> BTreeMap<&'static str, Outcome> {
    let mut m = BTreeMap::new();
    let pub_blob = BlobRef::of(&fx.pub_file).expect("pub file has content");
    let priv_blob = BlobRef::of(&fx.priv_file).expect("priv file has content");
    let new_data = bytes::Bytes::from(format!("probe {}", rand::random::<u64>()));
    let new_hash = Hash::of(&new_data);

    // Meta.
    macro_rules! meta {
        ($name:literal, $method:ident, $body:expr) => {{
            let body = $body;
            m.insert(
                $name,
                code(c, |ch| {
                    let r = c.request(body);
                    async move { Cluster::meta(ch).$method(r).await.map(drop) }
                })
                .await,
            );
        }};
    }
    meta!(
        "Meta.Lookup pub",
        lookup,
        pb::LookupRequest {
            parent: fx.pub_file.parent,
            name: "index.html".into()
        }
    );
    meta!(
        "Meta.Lookup priv",
        lookup,
        pb::LookupRequest {
            parent: fx.priv_root,
            name: "secret.html".into()
        }
    );
    meta!(
        "Meta.GetAttr pub",
        get_attr,
        pb::GetAttrRequest { ino: fx.pub_file.ino }
    );
    meta!(
        "Meta.GetAttr priv",
        get_attr,
        pb::GetAttrRequest { ino: fx.priv_file.ino }
    );
    meta!(
        "Meta.Resolve pub",
        resolve,
        pb::ResolveRequest {
            volume: "pub".into(),
            path: "index.html".into()
        }
    );
    meta!(
        "Meta.Resolve priv",
        resolve,
        pb::ResolveRequest {
            volume: "priv".into(),
            path: "secret.html".into()
        }
    );
    meta!(
        "Meta.ReadDir pub",
        read_dir,
        pb::ReadDirRequest {
            ino: fx.pub_file.parent,
            ..Default::default()
        }
    );
    meta!(
        "Meta.ReadDir priv",
        read_dir,
        pb::ReadDirRequest {
            ino: fx.priv_root,
            ..Default::default()
        }
    );
    meta!(
        "Meta.VolumeStamps",
        volume_stamps,
        pb::VolumeStampsRequest {
            volumes: vec!["pub".into(), "priv".into()]
        }
    );
    meta!(
        "Meta.Subscribe pub",
        subscribe,
        pb::SubscribeRequest {
            volume: "pub".into(),
            from_version: 0,
            tick_ms: 0
        }
    );
    meta!(
        "Meta.Subscribe priv",
        subscribe,
        pb::SubscribeRequest {
            volume: "priv".into(),
            from_version: 0,
            tick_ms: 0
        }
    );

    // Blobs.
    for (name, blob, ticket, ino) in [
        ("Blobs.Get pub ticket", &pub_blob, true, false),
        ("Blobs.Get pub ino", &pub_blob, false, true),
        ("Blobs.Get priv ticket", &priv_blob, true, false),
        ("Blobs.Get priv ino", &priv_blob, false, true),
        ("Blobs.Get priv bare", &priv_blob, false, false),
    ] {
        let body = blob_get(blob, ticket, ino);
        m.insert(
            name,
            code(c, |ch| {
                let r = c.request(body);
                async move { drain(Cluster::blobs(ch).get(r).await?.into_inner()).await }
            })
            .await,
        );
    }
    // Several small blobs in one call: each item is authorized as a Get.
    for (name, blob, ticket, ino) in [
        ("Blobs.GetSmall pub ticket", &pub_blob, true, false),
        ("Blobs.GetSmall priv ino", &priv_blob, false, true),
        ("Blobs.GetSmall priv bare", &priv_blob, false, false),
    ] {
        let body = pb::GetSmallRequest {
            blobs: vec![blob_get(blob, ticket, ino)],
        };
        m.insert(
            name,
            code(c, |ch| {
                let r = c.request(body);
                async move { Cluster::blobs(ch).get_small(r).await.map(drop) }
            })
            .await,
        );
    }
    // A ticket for one blob does not open another.
    let mut forged = blob_get(&priv_blob, false, false);
    forged.ticket = pub_blob.ticket.clone();
    m.insert(
        "Blobs.Get priv other ticket",
        code(c, |ch| {
            let r = c.request(forged);
            async move { drain(Cluster::blobs(ch).get(r).await?.into_inner()).await }
        })
        .await,
    );
    let put = ops::put_chunks(&new_data, 2);
    m.insert(
        "Blobs.Put",
        code(c, |ch| {
            let r = c.request(futures::stream::iter(put));
            async move { Cluster::blobs(ch).put(r).await.map(drop) }
        })
        .await,
    );
    let small = pb::PutSmallRequest {
        blobs: vec![pb::SmallBlob {
            hash: bytes::Bytes::copy_from_slice(&Hash::of(b"small probe").0),
            data: bytes::Bytes::from_static(b"small probe"),
        }],
        write_quorum: 2,
        forwarded: false,
    };
    m.insert(
        "Blobs.PutSmall",
        code(c, |ch| {
            let r = c.request(small);
            async move { Cluster::blobs(ch).put_small(r).await.map(drop) }
        })
        .await,
    );
    let missing = pb::MissingBlobsRequest {
        hashes: vec![bytes::Bytes::copy_from_slice(&new_hash.0)],
        sizes: Vec::new(),
        exists_only: false,
    };
    m.insert(
        "Blobs.Missing",
        code(c, |ch| {
            let r = c.request(missing);
            async move { Cluster::blobs(ch).missing(r).await.map(drop) }
        })
        .await,
    );

    // Write.
    let commit = ops::commit("priv", vec![ops::dir(&format!("d{}", rand::random::<u32>()), 0o755)]);
    m.insert(
        "Write.Commit priv",
        code(c, |ch| {
            let r = c.request(commit);
            async move { Cluster::write(ch).commit(r).await.map(drop) }
        })
        .await,
    );

    // Raft: servers only, whatever token a client holds.
    macro_rules! raft {
        ($name:literal, $method:ident) => {{
            m.insert(
                $name,
                code(c, |ch| {
                    let r = c.request(pb::RaftMessage {
                        payload: Default::default(),
                    });
                    async move { pb::raft_client::RaftClient::new(ch).$method(r).await.map(drop) }
                })
                .await,
            );
        }};
    }
    raft!("Raft.AppendEntries", append_entries);
    raft!("Raft.Vote", vote);
    raft!("Raft.InstallSnapshot", install_snapshot);

    // Admin.
    macro_rules! admin {
        ($name:literal, $method:ident, $body:expr) => {{
            let body = $body;
            m.insert(
                $name,
                code(c, |ch| {
                    let r = c.request(body);
                    async move { Cluster::admin(ch).$method(r).await.map(drop) }
                })
                .await,
            );
        }};
    }
    admin!(
        "Admin.CreateVolume",
        create_volume,
        pb::VolumeSpec {
            name: "probe".into(),
            ..Default::default()
        }
    );
    admin!("Admin.ListVolumes", list_volumes, pb::Empty {});
    admin!("Admin.GetVolume pub", get_volume, pb::VolumeName { name: "pub".into() });
    admin!(
        "Admin.GetVolume priv",
        get_volume,
        pb::VolumeName { name: "priv".into() }
    );
    admin!("Admin.Servers", servers, pb::Empty {});
    admin!("Admin.Status", status, pb::Empty {});
    admin!("Admin.Health", health, pb::Empty {});
    let bad_join = pb::JoinRequest {
        node_id: 99,
        addr: "127.0.0.1:1".into(),
        witness: false,
        join_key: "not-the-key".into(),
        csr_pem: String::new(),
    };
    admin!("Admin.Join", join, bad_join.clone());
    admin!("Admin.JoinToken", join_token, pb::JoinTokenRequest::default());
    admin!("Admin.JoinCredentials", join_credentials, bad_join);
    admin!(
        "Admin.RemoveServer",
        remove_server,
        pb::RemoveServerRequest { node_id: 99 }
    );
    admin!(
        "Admin.SetVolume",
        set_volume,
        pb::VolumeChanges {
            name: "priv".into(),
            public_read: Some(true),
            ..Default::default()
        }
    );
    admin!(
        "Admin.PutUser",
        put_user,
        pb::UserSpec {
            name: "mallory".into(),
            password: "long enough pw".into(),
            admin: true,
            create: true
        }
    );
    admin!("Admin.RemoveUser", remove_user, pb::UserName { name: "alice".into() });
    admin!("Admin.ListUsers", list_users, pb::Empty {});
    admin!(
        "Admin.Login",
        login,
        pb::LoginRequest {
            user: "alice".into(),
            password: "wrong password".into(),
            ttl_secs: 0
        }
    );
    admin!(
        "Admin.RotateKey",
        rotate_key,
        pb::RotateKeyRequest {
            add: true,
            retire: None
        }
    );
    admin!("Admin.WhoAmI", who_am_i, pb::Empty {});
    // Someone else's tokens: only an admin (or dave himself) may end them.
    admin!("Admin.RevokeUser", revoke_user, pb::UserName { name: "dave".into() });
    admin!(
        "Admin.RenewCertificate",
        renew_certificate,
        pb::RenewCertificateRequest { csr_pem: String::new() }
    );
    m
}

/// The documented answers for a caller: `public` lists what succeeds for everyone; `extra`
/// overrides per caller; everything else gets `default`.
fn expected(default: Code, extra: &[(&'static str, Code)]) -> BTreeMap<&'static str, Code> {
    let mut m: BTreeMap<&'static str, Code> = BTreeMap::new();
    for k in ALL {
        m.insert(k, default);
    }
    for k in PUBLIC_READS {
        m.insert(k, Code::Ok);
    }
    for k in PEER_ONLY {
        m.insert(k, Code::PermissionDenied);
    }
    // A wrong password and a join key unknown to the cluster are refused the same way for
    // everyone.
    for k in ["Admin.Login", "Admin.Join", "Admin.JoinCredentials"] {
        m.insert(k, Code::Unauthenticated);
    }
    // Blobs without a right to them: no ticket for this blob, no readable file.
    for k in [
        "Blobs.Get priv bare",
        "Blobs.Get priv other ticket",
        "Blobs.GetSmall priv bare",
    ] {
        m.insert(k, Code::PermissionDenied);
    }
    for (k, v) in extra {
        m.insert(k, *v);
    }
    m
}

const ALL: [&str; 47] = [
    "Meta.Lookup pub",
    "Meta.Lookup priv",
    "Meta.GetAttr pub",
    "Meta.GetAttr priv",
    "Meta.Resolve pub",
    "Meta.Resolve priv",
    "Meta.ReadDir pub",
    "Meta.ReadDir priv",
    "Meta.VolumeStamps",
    "Meta.Subscribe pub",
    "Meta.Subscribe priv",
    "Blobs.Get pub ticket",
    "Blobs.Get pub ino",
    "Blobs.Get priv ticket",
    "Blobs.Get priv ino",
    "Blobs.Get priv bare",
    "Blobs.Get priv other ticket",
    "Blobs.GetSmall pub ticket",
    "Blobs.GetSmall priv ino",
    "Blobs.GetSmall priv bare",
    "Blobs.Put",
    "Blobs.PutSmall",
    "Blobs.Missing",
    "Write.Commit priv",
    "Raft.AppendEntries",
    "Raft.Vote",
    "Raft.InstallSnapshot",
    "Admin.CreateVolume",
    "Admin.ListVolumes",
    "Admin.GetVolume pub",
    "Admin.GetVolume priv",
    "Admin.Servers",
    "Admin.Status",
    "Admin.Health",
    "Admin.Join",
    "Admin.JoinToken",
    "Admin.JoinCredentials",
    "Admin.RemoveServer",
    "Admin.SetVolume",
    "Admin.PutUser",
    "Admin.RemoveUser",
    "Admin.ListUsers",
    "Admin.Login",
    "Admin.RotateKey",
    "Admin.WhoAmI",
    "Admin.RevokeUser",
    "Admin.RenewCertificate",
];

/// What anyone may do: read public volumes (and the volume list, filtered), ask for health.
const PUBLIC_READS: [&str; 13] = [
    "Meta.Lookup pub",
    "Meta.GetAttr pub",
    "Meta.Resolve pub",
    "Meta.ReadDir pub",
    "Meta.VolumeStamps",
    "Meta.Subscribe pub",
    "Blobs.Get pub ticket",
    "Blobs.Get pub ino",
    "Blobs.GetSmall pub ticket",
    "Admin.ListVolumes",
    "Admin.GetVolume pub",
    "Admin.Health",
    // A ticket is a bearer right to one blob: whoever holds one (here: copied out of
    // alice's reply) reads that blob until it expires.
    "Blobs.Get priv ticket",
];

const PEER_ONLY: [&str; 4] = [
    "Raft.AppendEntries",
    "Raft.Vote",
    "Raft.InstallSnapshot",
    "Admin.RenewCertificate",
];

/// Reads of the private volume by someone who may not read it.
const PRIV_READS: [&str; 8] = [
    "Meta.Lookup priv",
    "Meta.GetAttr priv",
    "Meta.Resolve priv",
    "Meta.ReadDir priv",
    "Meta.Subscribe priv",
    "Blobs.Get priv ino",
    "Blobs.GetSmall priv ino",
    "Admin.GetVolume priv",
];

fn compare(who: &str, got: &BTreeMap<&'static str, Outcome>, want: &BTreeMap<&'static str, Code>) -> Result<()> {
    let wrong: Vec<String> = want
        .iter()
        .filter(|(k, v)| got.get(*k).map(|o| o.0) != Some(**v))
        .map(|(k, v)| match got.get(k) {
            Some(Outcome(c, msg)) => format!("{k}: got {c:?} ({msg}), documented {v:?}"),
            None => format!("{k}: not probed, documented {v:?}"),
        })
        .collect();
    ensure!(wrong.is_empty(), "{who}:\n  {}", wrong.join("\n  "));
    ensure!(
        got.len() == ALL.len(),
        "{who}: probed {} calls, expected {}",
        got.len(),
        ALL.len()
    );
    Ok(())
}

async fn admin_call<T, F, Fut>(tc: &TestCluster, f: F) -> Result<T>
where
    F: Fn(Cluster, tonic::transport::Channel) -> Fut,
    Fut: std::future::Future<Output = Result<T, tonic::Status>>,
{
    let c = tc.client();
    Ok(c.call(|ch| f(tc.client(), ch)).await?)
}

async fn add_user(tc: &TestCluster, name: &str) -> Result<String> {
    tc.add_user(name).await
}

async fn add_volume(tc: &TestCluster, name: &str, owner: &str, public: bool) -> Result<()> {
    let spec = pb::VolumeSpec {
        name: name.into(),
        owner: owner.into(),
        public_read: public,
        write_quorum: 2,
        ..Default::default()
    };
    admin_call(tc, |c, ch| {
        let r = c.request(spec.clone());
        async move { Cluster::admin(ch).create_volume(r).await }
    })
    .await?;
    Ok(())
}

/// Changes volume settings as the admin.
async fn set_volume(tc: &TestCluster, changes: pb::VolumeChanges) -> Result<()> {
    admin_call(tc, |c, ch| {
        let r = c.request(changes.clone());
        async move { Cluster::admin(ch).set_volume(r).await }
    })
    .await?;
    Ok(())
}

async fn set_public(tc: &TestCluster, name: &str, public: bool) -> Result<()> {
    let changes = pb::VolumeChanges {
        name: name.into(),
        public_read: Some(public),
        ..Default::default()
    };
    set_volume(tc, changes).await
}

/// Gives volume `name` a byte quota.
async fn set_quota(tc: &TestCluster, name: &str, bytes: u64) -> Result<()> {
    let changes = pb::VolumeChanges {
        name: name.into(),
        quota_bytes: Some(bytes),
        ..Default::default()
    };
    set_volume(tc, changes).await
}

fn as_user(tc: &TestCluster, token: Option<&str>) -> Result<Cluster> {
    let mut c = Cluster::new(&tc.addrs()[..1], tc.tls.clone(), token.map(str::to_string))?;
    c.policy.call_timeout = Duration::from_secs(10);
    Ok(c)
}

/// A TLS cluster with a public volume, alice's private volume and bob's volume.
async fn setup() -> Result<(TestCluster, Fixture, String, String, String)> {
    let tc = TestCluster::start(ClusterOpts::new(2, 1)).await?;
    let alice = add_user(&tc, "alice").await?;
    let bob = add_user(&tc, "bob").await?;
    let carol = add_user(&tc, "carol").await?;
    add_user(&tc, "dave").await?;
    add_volume(&tc, "pub", "admin", true).await?;
    add_volume(&tc, "priv", "alice", false).await?;
    add_volume(&tc, "bobs", "bob", false).await?;
    let admin = tc.client();
    TestCluster::write_file(&admin, "pub", "", "index.html", b"<h1>public page</h1>").await?;
    let as_alice = as_user(&tc, Some(&alice))?;
    TestCluster::write_file(&as_alice, "priv", "", "secret.html", b"<h1>alice's draft</h1>").await?;
    let resolve = |c: Cluster, vol: &'static str, path: &'static str| async move {
        let r = c
            .call(|ch| {
                let r = c.request(pb::ResolveRequest {
                    volume: vol.into(),
                    path: path.into(),
                });
                async move { Cluster::meta(ch).resolve(r).await.map(|r| r.into_inner()) }
            })
            .await?;
        r.attr.context("no attributes")
    };
    let pub_file = resolve(as_user(&tc, None)?, "pub", "index.html").await?;
    let priv_file = resolve(as_user(&tc, Some(&alice))?, "priv", "secret.html").await?;
    let priv_root = resolve(as_user(&tc, Some(&alice))?, "priv", "").await?.ino;
    ensure!(
        !pub_file.read_ticket.is_empty(),
        "attributes of a file carry a read ticket"
    );
    let fx = Fixture {
        pub_file,
        priv_file,
        priv_root,
    };
    Ok((tc, fx, alice, bob, carol))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_rpc_answers_as_documented_for_each_kind_of_caller() {
    bounded(async {
        let (tc, fx, alice, bob, carol) = setup().await?;

        // No token at all: only reads of public volumes.
        let mut want = expected(Code::Unauthenticated, &[]);
        for k in PRIV_READS {
            want.insert(k, Code::PermissionDenied);
        }
        compare("no token", &probe(&as_user(&tc, None)?, &fx).await, &want)?;
        // One blob named many times in a GetSmall is read and sent once.
        let stranger = as_user(&tc, None)?;
        let pub_blob = BlobRef::of(&fx.pub_file).context("pub file has content")?;
        let again = vec![blob_get(&pub_blob, true, false); 200];
        let got = stranger.get_small(None, again).await?;
        ensure!(got.len() == 1, "{} copies of one blob sent", got.len());

        // A token of a writer of another volume: may store blobs, nothing of alice's, no admin.
        let mut want = expected(Code::PermissionDenied, &[]);
        for k in [
            "Blobs.Put",
            "Blobs.PutSmall",
            "Blobs.Missing",
            "Admin.Servers",
            "Admin.Status",
            "Admin.WhoAmI",
        ] {
            want.insert(k, Code::Ok);
        }
        compare(
            "bob (writes another volume)",
            &probe(&as_user(&tc, Some(&bob))?, &fx).await,
            &want,
        )?;

        // A token of an account that may write no volume may not store blobs either.
        let mut want = expected(Code::PermissionDenied, &[]);
        for k in ["Admin.Servers", "Admin.Status", "Admin.WhoAmI"] {
            want.insert(k, Code::Ok);
        }
        compare(
            "carol (writes nothing)",
            &probe(&as_user(&tc, Some(&carol))?, &fx).await,
            &want,
        )?;

        // The owner reads and writes her volume.
        let mut want = expected(Code::PermissionDenied, &[]);
        for k in PRIV_READS
            .iter()
            .chain(&["Blobs.Put", "Blobs.PutSmall", "Blobs.Missing", "Write.Commit priv"])
            .chain(&["Admin.Servers", "Admin.Status", "Admin.WhoAmI"])
        {
            want.insert(k, Code::Ok);
        }
        compare("alice (owner)", &probe(&as_user(&tc, Some(&alice))?, &fx).await, &want)?;

        // A revoked token counts for nothing, on every server, within seconds.
        let erin = add_user(&tc, "erin").await?;
        let revoke = pb::UserName { name: "erin".into() };
        admin_call(&tc, |c, ch| {
            let r = c.request(revoke.clone());
            async move { Cluster::admin(ch).revoke_user(r).await }
        })
        .await?;
        let want = expected(Code::Unauthenticated, &[("Admin.ListVolumes", Code::Unauthenticated)]);
        for addr in tc.addrs() {
            let mut c = Cluster::new(std::slice::from_ref(&addr), tc.tls.clone(), Some(erin.clone()))?;
            c.policy.call_timeout = Duration::from_secs(10);
            wait_until(Duration::from_secs(10), "the revocation reaches every server", || {
                let c = &c;
                async move {
                    c.call(|ch| {
                        let r = c.request(pb::Empty {});
                        async move { Cluster::admin(ch).who_am_i(r).await }
                    })
                    .await
                    .is_err_and(|e| e.code() == Code::Unauthenticated)
                }
            })
            .await?;
            // Every call, on the data servers (a witness answers blob reads with UNAVAILABLE).
            if addr != tc.addrs()[2] {
                compare(&format!("revoked token at {addr}"), &probe(&c, &fx).await, &want)?;
            }
        }

        // A forged token (alice's claims, a wrong signature) counts for nothing.
        let forged = format!(
            "{}{}",
            &alice[..alice.len() - 4],
            if alice.ends_with("0000") { "1111" } else { "0000" }
        );
        // Reads of public volumes do not look at the token; the volume list refuses a bad one
        // rather than quietly showing less.
        let want = expected(Code::Unauthenticated, &[("Admin.ListVolumes", Code::Unauthenticated)]);
        compare("forged token", &probe(&as_user(&tc, Some(&forged))?, &fx).await, &want)?;

        // Listings show only what the caller may see.
        let names = |c: Cluster| async move {
            let l = c
                .call(|ch| {
                    let r = c.request(pb::Empty {});
                    async move { Cluster::admin(ch).list_volumes(r).await.map(|r| r.into_inner()) }
                })
                .await?;
            anyhow::Ok(l.volumes.into_iter().map(|v| v.name).collect::<Vec<_>>())
        };
        ensure!(names(as_user(&tc, None)?).await? == ["pub"]);
        ensure!(names(as_user(&tc, Some(&bob))?).await? == ["bobs", "pub"]);
        ensure!(names(as_user(&tc, Some(&alice))?).await? == ["priv", "pub"]);
        ensure!(names(tc.client()).await?.len() == 3, "an admin sees every volume");
        let c = as_user(&tc, None)?;
        let stamps = c
            .call(|ch| {
                let r = c.request(pb::VolumeStampsRequest::default());
                async move { Cluster::meta(ch).volume_stamps(r).await.map(|r| r.into_inner()) }
            })
            .await?;
        let shown: Vec<_> = stamps
            .stamps
            .iter()
            .filter(|s| s.exists)
            .map(|s| s.volume.as_str())
            .collect();
        ensure!(shown == ["pub"], "stamps without a token show {shown:?}");
        let listed: Vec<_> = stamps.stamps.iter().map(|s| s.volume.as_str()).collect();
        ensure!(listed == ["pub"], "private names are not listed either: {listed:?}");
        let many = c
            .call(|ch| {
                let r = c.request(pb::VolumeStampsRequest {
                    volumes: vec!["x".into(); 10_001],
                });
                async move { Cluster::meta(ch).volume_stamps(r).await.map(drop) }
            })
            .await;
        ensure!(many.is_err(), "10,001 names in one stamps request are refused");

        // A login with a name or password longer than any account's is refused before it is
        // logged or hashed.
        for (user, password) in [
            ("u".repeat(1 << 20), "p".to_string()),
            ("alice".into(), "p".repeat(1 << 20)),
        ] {
            let r = c
                .call(|ch| {
                    let r = c.request(pb::LoginRequest {
                        user: user.clone(),
                        password: password.clone(),
                        ..Default::default()
                    });
                    async move { Cluster::admin(ch).login(r).await.map(drop) }
                })
                .await;
            ensure!(r.is_err(), "an overlong login is refused");
        }
        let log = tc.servers[0].log();
        ensure!(!log.contains(&"u".repeat(300)), "an overlong user name reached the log");

        // Who follows a public volume (mount addresses) is for those who run it. A mount
        // follows one server: find it, then ask that server without a token.
        let info = |c: Cluster| async move {
            c.call(|ch| {
                let r = c.request(pb::VolumeName { name: "pub".into() });
                async move { Cluster::admin(ch).get_volume(r).await.map(|r| r.into_inner()) }
            })
            .await
        };
        let _follower = Mount::start(&tc.client_args(), tc.root.path(), "follower", &["--read-only"])?;
        let mut followed = None;
        for _ in 0..100 {
            for addr in tc.addrs() {
                if info(tc.client_on(&addr)).await.is_ok_and(|i| !i.subscribers.is_empty()) {
                    followed = Some(addr);
                }
            }
            if followed.is_some() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let addr = followed.context("no server lists the mount as following pub within 10 s")?;
        let anonymous = Cluster::new(&[addr], tc.tls.clone(), None)?;
        ensure!(
            info(anonymous).await?.subscribers.is_empty(),
            "anonymous readers see no subscribers"
        );
        Ok(())
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn stored_but_uncommitted_bytes_count_against_the_uploaders_quota() {
    bounded(async {
        let (tc, _fx, _alice, bob, _carol) = setup().await?;
        set_quota(&tc, "bobs", 100_000).await?;
        let c = as_user(&tc, Some(&bob))?;
        c.put_blob(bytes::Bytes::from(vec![1u8; 60_000]), 2).await?;
        let second = bytes::Bytes::from(vec![2u8; 60_000]);
        let e = c
            .put_blob(second.clone(), 2)
            .await
            .expect_err("over the quota's headroom");
        ensure!(e.code() == Code::ResourceExhausted, "{e}");
        ensure!(e.to_string().contains("not yet committed"), "{e}");
        // Committing the first blob frees its bytes from the pending count (they are used now,
        // and the volume's own quota covers them).
        c.commit(ops::commit("bobs", vec![ops::file("a.bin", &[1u8; 60_000], 0o644)]))
            .await?;
        let e = c
            .put_blob(second, 2)
            .await
            .expect_err("the volume itself is now nearly full");
        ensure!(e.code() == Code::ResourceExhausted, "{e}");
        c.put_blob(bytes::Bytes::from(vec![3u8; 30_000]), 2).await?;
        Ok(())
    })
    .await
}

/// A store whose content does not verify is refused and charges nothing: bytes that were
/// never stored cannot use up an account's headroom (and, since a full account is refused
/// rather than trimmed, cannot push real charges out either).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_store_that_fails_verification_charges_nothing() {
    bounded(async {
        let (tc, _fx, _alice, bob, _carol) = setup().await?;
        set_quota(&tc, "bobs", 100_000).await?;
        let c = as_user(&tc, Some(&bob))?;
        // 90,000 bytes under a hash they do not have.
        let forged = pb::PutSmallRequest {
            blobs: vec![pb::SmallBlob {
                hash: bytes::Bytes::copy_from_slice(&Hash::of(b"something else").0),
                data: bytes::Bytes::from(vec![7u8; 90_000]),
            }],
            write_quorum: 2,
            forwarded: false,
        };
        let e = c
            .call(|ch| {
                let r = c.request(forged.clone());
                async move { Cluster::blobs(ch).put_small(r).await }
            })
            .await
            .expect_err("content that does not match its hash");
        ensure!(
            e.to_string().contains("mismatch") || e.to_string().contains("hash"),
            "{e}"
        );
        // Had the forged 90,000 bytes been charged, 60,000 more would not fit the 100,000.
        c.put_blob(bytes::Bytes::from(vec![1u8; 60_000]), 2).await?;
        Ok(())
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn mounts_read_private_volumes_only_with_a_readers_token_and_lock_down_when_made_private() {
    bounded(async {
        let (tc, _fx, alice, _bob, _carol) = setup().await?;
        // A web node without tokens, and a node where alice logged in.
        let web = Mount::start(&tc.client_args(), tc.root.path(), "web", &["--read-only"])?;
        let node = Mount::start(&tc.client_args(), tc.root.path(), "node", &[])?;
        let reply = node.control(&format!("login {alice}"))?;
        ensure!(reply["ok"] == true, "{reply}");
        let secret = node.path.join("priv/secret.html");
        wait_until(Duration::from_secs(10), "alice's node shows her private volume", || {
            let p = secret.clone();
            async move { read_file(&p).is_ok_and(|d| d == b"<h1>alice's draft</h1>") }
        })
        .await
        .map_err(|e| anyhow::anyhow!("{e}\n{}", node.log()))?;
        ensure!(
            !web.path.join("priv").exists(),
            "a node without a token must not see a private volume"
        );
        let page = web.path.join("pub/index.html");
        ensure!(read_file(&page)? == b"<h1>public page</h1>");

        // Made private: within seconds the web node no longer serves it, cached or not.
        set_public(&tc, "pub", false).await?;
        let dir = web.path.join("pub");
        wait_until(Duration::from_secs(10), "the web node locks the volume down", || {
            let (p, d) = (page.clone(), dir.clone());
            async move { read_file(&p).is_err() && !d.exists() }
        })
        .await
        .map_err(|e| anyhow::anyhow!("{e}\n{}", web.log()))?;
        // Public again: it comes back.
        set_public(&tc, "pub", true).await?;
        wait_until(Duration::from_secs(10), "the volume is back on the web node", || {
            let p = page.clone();
            async move { read_file(&p).is_ok_and(|d| d == b"<h1>public page</h1>") }
        })
        .await?;
        Ok(())
    })
    .await
}

/// A client presenting server `i`'s certificate and key (no token).
fn as_server(tc: &TestCluster, i: usize) -> Result<Cluster> {
    let dir = &tc.servers[i].dir;
    let identity = tonic::transport::Identity::from_pem(
        std::fs::read_to_string(dir.join("tls/server.crt"))?,
        std::fs::read_to_string(dir.join("tls/server.key"))?,
    );
    let codafs_client::transport::Tls::Ca { ca_pem, .. } = &tc.tls else {
        anyhow::bail!("the test cluster runs TLS")
    };
    let tls = codafs_client::transport::Tls::Ca {
        ca_pem: ca_pem.clone(),
        identity: Some(identity),
    };
    let mut c = Cluster::new(&tc.addrs()[..1], tls, None)?;
    c.policy.call_timeout = Duration::from_secs(10);
    Ok(c)
}

/// `Admin.JoinCredentials` for node 99 with join token `token`.
async fn join_credentials(tc: &TestCluster, token: &str) -> Result<tonic::Status> {
    let t = codafs_common::join::JoinToken::decode(token)?;
    let c = as_user(tc, None)?;
    let req = pb::JoinRequest {
        node_id: 99,
        addr: "127.0.0.1:1".into(),
        witness: false,
        join_key: t.join_key,
        csr_pem: String::new(),
    };
    let out = c
        .call(|ch| {
            let r = c.request(req.clone());
            async move { Cluster::admin(ch).join_credentials(r).await }
        })
        .await;
    Ok(match out {
        Ok(_) => tonic::Status::ok("credentials handed out"),
        Err(e) => tonic::Status::new(e.code(), e.to_string()),
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_removed_servers_certificate_and_spent_join_tokens_count_for_nothing() {
    bounded(async {
        let (mut tc, fx, _, _, _) = setup().await?;
        let token = tc.new_join_token(0).await?;
        let victim = tc.join_with(&token).await?;
        let victim_id = tc.status_of(&tc.servers[victim].addr).await?.node_id;

        // A current member's certificate passes the peer checks: Raft messages get as far as
        // decoding (these are empty), blobs may be stored and any blob read (repair), and the
        // membership and status may be read.
        let mut want = expected(Code::Unauthenticated, &[]);
        for k in PRIV_READS {
            want.insert(k, Code::PermissionDenied);
        }
        let mut member = want.clone();
        for k in PEER_ONLY {
            member.insert(k, Code::InvalidArgument);
        }
        for k in [
            "Blobs.Get priv bare",
            "Blobs.Get priv other ticket",
            "Blobs.Get priv ino",
            "Blobs.GetSmall priv bare",
            "Blobs.GetSmall priv ino",
            "Blobs.Put",
            "Blobs.PutSmall",
            "Blobs.Missing",
            "Admin.Servers",
            "Admin.Status",
        ] {
            member.insert(k, Code::Ok);
        }
        compare(
            "a member's certificate",
            &probe(&as_server(&tc, victim)?, &fx).await,
            &member,
        )?;

        // Removed: its certificate, still signed by the cluster CA, counts for nothing at once.
        let rm = pb::RemoveServerRequest { node_id: victim_id };
        admin_call(&tc, |c, ch| {
            let r = c.request(rm);
            async move { Cluster::admin(ch).remove_server(r).await }
        })
        .await?;
        tc.kill(victim);
        let removed = as_server(&tc, victim)?;
        wait_until(Duration::from_secs(10), "the removal reaches the first server", || {
            let c = &removed;
            async move {
                c.call(|ch| {
                    let r = c.request(pb::RaftMessage {
                        payload: Default::default(),
                    });
                    async move { pb::raft_client::RaftClient::new(ch).vote(r).await }
                })
                .await
                .is_err_and(|e| e.code() == Code::PermissionDenied)
            }
        })
        .await?;
        compare("a removed server's certificate", &probe(&removed, &fx).await, &want)?;

        // The join token it used admits nobody else; an expired one admits nobody.
        let used = join_credentials(&tc, &token).await?;
        ensure!(
            used.code() == Code::PermissionDenied && used.message().contains("already used"),
            "a spent join token: {used:?}"
        );
        let short = tc.new_join_token(1).await?;
        tokio::time::sleep(Duration::from_millis(1500)).await;
        let expired = join_credentials(&tc, &short).await?;
        ensure!(
            expired.code() == Code::PermissionDenied && expired.message().contains("expired"),
            "an expired join token: {expired:?}"
        );
        Ok(())
    })
    .await
}

/// A damaged copy is a missing copy, not a refusal: with the leader's copy cut short, a commit
/// declaring the content's true size goes through on the other replica's good copy. (Before,
/// the leader's own copy of another size refused every commit naming that content.)
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_damaged_copy_on_the_leader_does_not_refuse_a_true_size() {
    bounded(async {
        // Repair off, so the damaged copy stays as it is while the commit is checked.
        let opts = ClusterOpts::new(2, 1)
            .arg("--repair-interval-ms", "3600000")
            .arg("--full-repair-interval-s", "3600");
        let tc = TestCluster::start(opts).await?;
        tc.create_volume("q", 1).await?;
        let c = tc.client();
        let content = vec![7u8; 60_000];
        let hash = c.put_content(&content, 2).await?;
        let leader = tc.leader().await?;
        ensure!(
            tc.has_blobs(&tc.addrs()[1 - leader], &[hash]).await?,
            "the put reached both data replicas"
        );
        let damaged = std::fs::OpenOptions::new()
            .write(true)
            .open(tc.blob_path(leader, &hash))
            .context("the leader's copy")?;
        damaged.set_len(1000)?;
        drop(damaged);
        let honest = ops::file_hashed("big.bin", hash, content.len() as u64, 0o644);
        c.commit(ops::commit("q", vec![honest])).await?;
        ensure!(tc.volume_info("q").await?.used_bytes == 60_000);
        Ok(())
    })
    .await
}

/// A commit that declares a size its content does not have is refused even when the leader
/// holds no copy of that content: the other replicas check the size too. (Before, only the
/// leader's own copy was checked, so a client could store 60,000 bytes and have a quota
/// charged 10.)
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_size_declared_falsely_is_refused_on_every_replica_not_only_the_leaders() {
    bounded(async {
        let tc = TestCluster::start(ClusterOpts::new(2, 1)).await?;
        tc.create_volume("q", 1).await?;
        let c = tc.client();
        let content = vec![9u8; 60_000];
        let hash = c.put_content(&content, 2).await?;
        let leader = tc.leader().await?;
        let follower = 1 - leader;
        ensure!(
            tc.has_blobs(&tc.addrs()[follower], &[hash]).await?,
            "the put reached both data replicas"
        );
        // The leader loses its copy; the follower's alone meets the volume's quorum of 1.
        std::fs::remove_file(tc.blob_path(leader, &hash)).context("removing the leader's copy")?;
        let lie = ops::file_hashed("big.bin", hash, 10, 0o644);
        let e = c
            .commit(ops::commit("q", vec![lie]))
            .await
            .expect_err("a false size is refused");
        ensure!(e.code() == Code::InvalidArgument, "{e}");
        ensure!(e.to_string().contains("does not match the copy stored on"), "{e}");
        ensure!(tc.volume_info("q").await?.used_bytes == 0, "nothing was charged");
        // The true size is taken, on the follower's copy alone.
        let honest = ops::file_hashed("big.bin", hash, content.len() as u64, 0o644);
        c.commit(ops::commit("q", vec![honest])).await?;
        ensure!(tc.volume_info("q").await?.used_bytes == 60_000);
        Ok(())
    })
    .await
}
