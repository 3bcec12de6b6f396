//! A short round of the fault suite (`fanfare_tests::chaos`): every fault once, then one round
//! of 2–4 faults at once — always a Redis data loss and a frozen node, the rest drawn from
//! every kind — under traffic through HAProxy. Nothing acked may be lost or doubled and every count must agree at the
//! end. `scripts/chaos` runs the long version.

use fanfare_tests::chaos::{ChaosPlan, run};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn no_acked_like_is_lost_or_doubled_under_faults() -> anyhow::Result<()> {
    let seed = std::env::var("FANFARE_CHAOS_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(7);
    let report = run(&ChaosPlan::short(seed)).await?;
    eprintln!("{}", report.table());
    assert!(report.acked > 500, "only {} likes acked", report.acked);
    assert_eq!(report.audit.missing, 0, "acked likes lost");
    assert_eq!(report.audit.doubled, 0, "likes stored twice");
    assert_eq!(
        report.audit.unexplained, 0,
        "stored likes nobody was acked for"
    );
    assert!(
        report.mismatched.is_empty(),
        "counts disagree: {:?}",
        report.mismatched
    );
    assert!(report.live_converged.is_some(), "live counts never agreed");
    assert!(report.passed());
    Ok(())
}
