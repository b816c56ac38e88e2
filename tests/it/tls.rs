//! TLS to PostgreSQL: libpq's sslmodes against a server with `ssl = on` and
//! a certificate authority made here with openssl.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use docworker::config::DatabaseSettings;
use serde_json::json;

use crate::harness::{connect, run_worker, Cluster, WorkerProcess};

/// `openssl` with these arguments, in `dir`; panics with its output.
fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("running openssl");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A CA (ca.crt), a server certificate it signed for `localhost` only
/// (server.crt, server.key), and a CA that signed nothing (other-ca.crt).
fn certificates(dir: &Path) {
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
    ];
    for (name, subject) in [
        ("ca", "/CN=docworker test CA"),
        ("other-ca", "/CN=someone else"),
    ] {
        let key = format!("{name}.key");
        let crt = format!("{name}.crt");
        let mut args = vec!["req", "-x509"];
        args.extend(ec);
        args.extend([
            "-keyout", &key, "-out", &crt, "-days", "2", "-subj", subject,
        ]);
        args.extend(["-addext", "basicConstraints=critical,CA:TRUE"]);
        args.extend(["-addext", "keyUsage=critical,keyCertSign,cRLSign"]);
        openssl(dir, &args);
    }
    let mut args = vec!["req"];
    args.extend(ec);
    args.extend([
        "-keyout",
        "server.key",
        "-out",
        "server.csr",
        "-subj",
        "/CN=localhost",
    ]);
    openssl(dir, &args);
    std::fs::write(
        dir.join("server.ext"),
        "subjectAltName=DNS:localhost\nbasicConstraints=CA:FALSE\nkeyUsage=digitalSignature\nextendedKeyUsage=serverAuth\n",
    )
    .unwrap();
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            "ca.crt",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            "server.crt",
            "-days",
            "2",
            "-extfile",
            "server.ext",
        ],
    );
}

fn settings(url: &str) -> DatabaseSettings {
    DatabaseSettings {
        url: url.to_string(),
        password_file: Default::default(),
        sslmode: "prefer".into(),
        sslrootcert: Default::default(),
        pool_size: 4,
        connect_timeout: Duration::from_secs(5),
    }
}

/// Connects as docworker does; whether the session is encrypted, or the
/// error in full.
async fn session(url: &str) -> Result<bool, String> {
    let client = docworker::db::connect(&settings(url), "docworker tls test")
        .await
        .map_err(|e| format!("{e:#}"))?;
    let row = client
        .query_one(
            "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
            &[],
        )
        .await
        .map_err(|e| e.to_string())?;
    Ok(row.get(0))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_to_postgres_follows_the_sslmode() {
    let dir = tempfile::tempdir().unwrap();
    certificates(dir.path());
    let cluster = Cluster::start_with_tls(
        &dir.path().join("server.crt"),
        &dir.path().join("server.key"),
    );
    let db = cluster.database(true).await;
    let port = db
        .url
        .rsplit_once(':')
        .unwrap()
        .1
        .split('/')
        .next()
        .unwrap()
        .to_string();
    let name = db.url.rsplit('/').next().unwrap().to_string();
    let ca = dir.path().join("ca.crt").display().to_string();
    let other = dir.path().join("other-ca.crt").display().to_string();
    let url = |host: &str, query: &str| format!("postgres://postgres@{host}:{port}/{name}?{query}");

    // verify-full: the chain and the name.
    let full = url(
        "localhost",
        &format!("sslmode=verify-full&sslrootcert={ca}"),
    );
    assert_eq!(session(&full).await, Ok(true));
    let err = session(&url(
        "127.0.0.1",
        &format!("sslmode=verify-full&sslrootcert={ca}"),
    ))
    .await
    .unwrap_err();
    assert!(
        err.contains("sslmode verify-full") && err.contains("not valid for name"),
        "a wrong host name: {err}"
    );
    let err = session(&url(
        "localhost",
        &format!("sslmode=verify-full&sslrootcert={other}"),
    ))
    .await
    .unwrap_err();
    assert!(err.contains("UnknownIssuer"), "an unknown CA: {err}");
    // The built-in roots do not know this CA either.
    let err = session(&url("localhost", "sslmode=verify-full"))
        .await
        .unwrap_err();
    assert!(err.contains("UnknownIssuer"), "{err}");

    // verify-ca: the chain only.
    assert_eq!(
        session(&url(
            "127.0.0.1",
            &format!("sslmode=verify-ca&sslrootcert={ca}")
        ))
        .await,
        Ok(true)
    );
    let err = session(&url(
        "127.0.0.1",
        &format!("sslmode=verify-ca&sslrootcert={other}"),
    ))
    .await
    .unwrap_err();
    assert!(err.contains("UnknownIssuer"), "{err}");

    // require and prefer encrypt without checking; disable does not.
    assert_eq!(
        session(&url("127.0.0.1", "sslmode=require")).await,
        Ok(true)
    );
    assert_eq!(session(&url("127.0.0.1", "sslmode=prefer")).await, Ok(true));
    assert_eq!(
        session(&url("127.0.0.1", "sslmode=disable")).await,
        Ok(false)
    );
    // The setting, when the URL says nothing.
    let mut from_setting = settings(&url("localhost", ""));
    from_setting.sslmode = "verify-full".into();
    from_setting.sslrootcert = dir.path().join("other-ca.crt");
    let err = docworker::db::connect(&from_setting, "t")
        .await
        .unwrap_err();
    assert!(format!("{err:#}").contains("UnknownIssuer"), "{err:#}");

    // The daemon over verify-full: the pool and the LISTEN session.
    let (code, out, err) = run_worker(&full, &["jobs"], &[]);
    assert_eq!(code, 0, "{out}\n{err}");
    let worker = WorkerProcess::spawn(&full, &[]);
    let job = db.noop_job(json!({})).await;
    db.wait_status(job, "completed", Duration::from_secs(30))
        .await;
    let admin = connect(&db.url).await;
    let encrypted: i64 = admin
        .query_one(
            "SELECT count(*) FROM pg_stat_ssl JOIN pg_stat_activity USING (pid)
              WHERE ssl AND application_name LIKE 'docworker%'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(
        encrypted >= 2,
        "the pool and LISTEN sessions use TLS: {encrypted}\n{}",
        worker.logs()
    );
    drop(worker);
}
