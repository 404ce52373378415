//! Progress on a terminal for the long stages (ingest, load calls, match, apply): counts and
//! rates on stderr, drawn only when stderr is a terminal (indicatif hides them otherwise).

use std::time::Duration;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

/// A bar for a stage with a known amount of work.
pub fn bar(stage: &'static str, len: u64, unit: &'static str) -> ProgressBar {
    let pb = ProgressBar::with_draw_target(Some(len), ProgressDrawTarget::stderr());
    pb.set_style(
        ProgressStyle::with_template(&format!(
            "{{prefix:>12.bold}} [{{bar:30}}] {{human_pos}}/{{human_len}} {unit} ({{per_sec}}, {{eta}} left) {{msg}}"
        ))
        .expect("valid template")
        .progress_chars("=> "),
    );
    pb.set_prefix(stage);
    pb
}

/// A spinner for a stage whose size is not known in advance.
pub fn spinner(stage: &'static str, unit: &'static str) -> ProgressBar {
    let pb = ProgressBar::with_draw_target(None, ProgressDrawTarget::stderr());
    pb.set_style(
        ProgressStyle::with_template(&format!(
            "{{prefix:>12.bold}} {{spinner}} {{human_pos}} {unit} ({{per_sec}}) {{msg}}"
        ))
        .expect("valid template"),
    );
    pb.set_prefix(stage);
    pb.enable_steady_tick(Duration::from_millis(120));
    pb
}
