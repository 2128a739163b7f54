//! The demo's training end to end on the embedded digits: accuracy far above chance for both
//! arms, SAR's gate passes and its p2a term is active, and the same seed repeats exactly.
use sar_train::demo::{run_demo, summary, DemoConfig};

#[test]
fn short_demo_learns_and_sar_is_active() {
    let cfg = DemoConfig {
        seeds: vec![3],
        epochs: 40,
        ..Default::default()
    };
    let report = run_demo(&cfg, &mut |_| {}).unwrap();
    assert_eq!(report.train_counts.iter().sum::<u64>(), 468);
    assert_eq!(report.test_images, 599);
    let (base, sar) = (&report.runs[0], &report.runs[1]);
    assert!(!base.sar && sar.sar);
    // Chance is 10%.
    assert!(
        base.top1 > 0.8 && sar.top1 > 0.8,
        "top-1 {} / {}",
        base.top1,
        sar.top1
    );
    assert!(base.gate_first_pass.is_none());
    let first = sar.gate_first_pass.expect("SAR's gate never passed");
    assert!(first < 100, "gate first passed at step {first}");
    assert!(
        sar.gate_pass_rate > 0.9 && sar.last_loss_p2a > 0.0,
        "{sar:?}"
    );
    let table = summary(&report);
    assert!(
        table.contains("SAR − baseline") && table.contains("within noise"),
        "{table}"
    );
    // Same seed, same run, to the bit.
    let again = run_demo(&cfg, &mut |_| {}).unwrap();
    assert_eq!(again.runs[1].per_class_accuracy, sar.per_class_accuracy);
    assert_eq!(again.runs[1].last_loss_p2a, sar.last_loss_p2a);
}
