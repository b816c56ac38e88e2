//! Helpers every test file shares: the `worker` binary run to completion,
//! waiting for a row to reach a state, and the audit trail of status changes.

use std::time::{Duration, Instant};

use serde_json::Value;
use tokio_postgres::Client;
use uuid::Uuid;

use crate::harness::run_worker;

/// Runs the `worker` binary against `url` with `args` and `env` (on top of
/// the harness's fast settings) to completion, off the async threads;
/// returns (exit code, stdout, stderr).
pub async fn worker(url: &str, args: &[&str], env: &[(&str, &str)]) -> (i32, String, String) {
    let url = url.to_owned();
    let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
    let env: Vec<(String, String)> = env
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    tokio::task::spawn_blocking(move || {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        run_worker(&url, &args, &env)
    })
    .await
    .unwrap()
}

/// The job's row as JSON (`to_jsonb`), every column.
pub async fn row_json(client: &Client, id: Uuid) -> Value {
    client
        .query_one("SELECT to_jsonb(t) FROM job_tasks t WHERE id = $1", &[&id])
        .await
        .unwrap()
        .get(0)
}

/// Waits until `check` holds for the job's row (as JSON) and returns that
/// row; panics after `timeout` with `what` and the row.
pub async fn wait_row(
    client: &Client,
    id: Uuid,
    what: &str,
    timeout: Duration,
    check: impl Fn(&Value) -> bool,
) -> Value {
    let start = Instant::now();
    loop {
        let row = row_json(client, id).await;
        if check(&row) {
            return row;
        }
        if start.elapsed() > timeout {
            panic!("waited {timeout:?} for job {id} to be {what}; row: {row:#}");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Records in `job_audit` every claim (any update that sets `processing`)
/// and every status change of `job_tasks`: the old and new status, the
/// attempt and `run_at` after it, `locked_by` after it, the worker involved
/// (the claimer for claims, the previous lease holder otherwise), the old
/// lease, the writing transaction's `now()` (what the worker stores in
/// `started_at` and `errors[].at`) and the wall clock of the write.
pub async fn install_audit(client: &Client) {
    client
        .batch_execute(
            "CREATE TABLE job_audit (
                 seq        bigserial PRIMARY KEY,
                 id         uuid NOT NULL,
                 old_status text,
                 new_status text NOT NULL,
                 attempt    int NOT NULL,
                 run_at     timestamptz NOT NULL,
                 locked_by  text,
                 worker     text,
                 old_lease  timestamptz,
                 tx_at      timestamptz NOT NULL,
                 at         timestamptz NOT NULL);
             CREATE FUNCTION job_audit() RETURNS trigger LANGUAGE plpgsql AS $$
             BEGIN
                 INSERT INTO job_audit (id, old_status, new_status, attempt, run_at, locked_by,
                                        worker, old_lease, tx_at, at)
                 VALUES (NEW.id, OLD.status, NEW.status, NEW.attempt, NEW.run_at, NEW.locked_by,
                         CASE WHEN NEW.status = 'processing' THEN NEW.locked_by ELSE OLD.locked_by END,
                         OLD.locked_until, now(), clock_timestamp());
                 RETURN NULL;
             END $$;
             CREATE TRIGGER job_audit AFTER UPDATE OF status ON job_tasks
                 FOR EACH ROW
                 WHEN (NEW.status = 'processing' OR OLD.status IS DISTINCT FROM NEW.status)
                 EXECUTE FUNCTION job_audit();",
        )
        .await
        .unwrap();
}

/// The plans of one write cycle that claims `limit` jobs (and records
/// nothing), the statements nested in `docworker_claimable` included, as
/// PostgreSQL ran them: `EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON)` output by
/// `auto_explain`, outermost last. Rolled back: nothing is claimed.
/// (The outer statement, last, is JIT-compiled: `jit_above_cost` is 0 in
/// this session.)
pub async fn claim_plans(url: &str, limit: i64) -> Vec<Value> {
    use futures_util::StreamExt;
    let (client, mut connection) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .unwrap();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        let mut messages = futures_util::stream::poll_fn(move |cx| connection.poll_message(cx));
        while let Some(Ok(message)) = messages.next().await {
            if let tokio_postgres::AsyncMessage::Notice(notice) = message {
                let _ = tx.send(notice.message().to_owned());
            }
        }
    });
    let mut sql = docworker::store::cycle::statement(&limit.to_string(), &[docworker::tasks::NOOP]);
    for (param, value) in [
        ("$10", "'{}'"),
        ("$9", "30"),
        ("$8", "'explain-worker'"),
        ("$7", "2"),
        ("$6", "1"),
        ("$5", "'{}'"),
        ("$4", "'{}'"),
        ("$3", "'{}'"),
        ("$2", "'{}'"),
        ("$1", "'{}'"),
    ] {
        sql = sql.replace(param, value);
    }
    assert!(!sql.contains('$'), "{sql}");
    client
        .batch_execute(
            "LOAD 'auto_explain';
             SET auto_explain.log_min_duration = 0;
             SET auto_explain.log_nested_statements = on;
             SET auto_explain.log_analyze = on;
             SET auto_explain.log_buffers = on;
             SET auto_explain.log_timing = off;
             SET auto_explain.log_format = json;
             SET auto_explain.log_level = notice;
             SET client_min_messages = notice;
             -- Whatever can be JIT-compiled is, so a plan that would be on
             -- a large enough table shows it here.
             SET jit_above_cost = 0;
             BEGIN",
        )
        .await
        .unwrap();
    client.batch_execute(&sql).await.unwrap();
    client.batch_execute("ROLLBACK").await.unwrap();
    drop(client);
    let mut plans = Vec::new();
    while let Some(notice) = rx.recv().await {
        // "duration: 0.123 ms  plan:\n{...}"
        if let Some(at) = notice.find('{') {
            plans.push(serde_json::from_str(&notice[at..]).unwrap());
        }
    }
    plans
}

/// Every node of an EXPLAIN (FORMAT JSON) plan, depth first.
pub fn plan_nodes<'a>(node: &'a Value, out: &mut Vec<&'a Value>) {
    out.push(node);
    if let Some(children) = node["Plans"].as_array() {
        for child in children {
            plan_nodes(child, out);
        }
    }
}

/// `n` sentences of plain English prose (about 75 bytes each), in
/// paragraphs of six; `tag` makes two texts differ throughout.
pub fn prose(n: usize, tag: &str) -> String {
    const WHO: [&str; 8] = [
        "The old lighthouse keeper",
        "A young botanist",
        "The river pilot",
        "Our neighbour's cat",
        "The village baker",
        "A travelling musician",
        "The night watchman",
        "The harbour master",
    ];
    const DID: [&str; 6] = [
        "counted the gulls on",
        "painted a picture of",
        "walked slowly along",
        "wrote a long letter about",
        "told a strange story about",
        "repaired the fence near",
    ];
    const WHERE: [&str; 7] = [
        "the northern pier",
        "the chalk cliffs",
        "the market square",
        "the flooded meadow",
        "the old stone bridge",
        "the pine forest",
        "the empty railway station",
    ];
    let mut out = String::new();
    for i in 0..n {
        if i > 0 {
            out.push_str(if i % 6 == 0 { "\n\n" } else { " " });
        }
        out.push_str(&format!(
            "{tag}{} {} {} on day {}.",
            WHO[i % WHO.len()],
            DID[i % DID.len()],
            WHERE[i % WHERE.len()],
            i + 1
        ));
    }
    out
}
