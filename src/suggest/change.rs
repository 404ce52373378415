//! A suggested change to a job's rules: what it is, its one line for a person, its stable id.

use crate::decision::TargetKind;
use crate::job::Normalizer;

/// One change to the job file's rules. Rules are named by their `name`; keys by their position
/// in the rule's `keys` (and their event path, for the person reading it).
#[derive(Debug, Clone, PartialEq)]
pub enum Change {
    /// `normalize = "…"` on a key (added, or replacing the one it has).
    Normalize { rule: String, key: usize, event: String, column: String, normalize: Normalizer },
    /// A call rule's window widened: the sides given, in whole minutes.
    Window { rule: String, before: Option<i64>, after: Option<i64> },
    /// A key dropped from a rule with more than one.
    DropKey { rule: String, key: usize, event: String, column: String },
    /// A rule of one key added after the others (`ambiguous = "report"`).
    NewRule {
        name: String,
        target: TargetKind,
        event: String,
        column: &'static str,
        normalize: Option<Normalizer>,
        /// For a call rule, its window in whole minutes.
        window: Option<(i64, i64)>,
    },
    /// `ambiguous = "nearest"` instead of `report`.
    AmbiguousNearest { rule: String },
}

impl Change {
    /// The contract's kind.
    pub fn kind(&self) -> &'static str {
        match self {
            Change::Normalize { .. } => "normalize",
            Change::Window { .. } => "window",
            Change::DropKey { .. } => "drop_key",
            Change::NewRule { .. } => "new_rule",
            Change::AmbiguousNearest { .. } => "ambiguous_nearest",
        }
    }

    /// The rule it changes (a new rule's own name).
    pub fn rule(&self) -> &str {
        match self {
            Change::Normalize { rule, .. }
            | Change::Window { rule, .. }
            | Change::DropKey { rule, .. }
            | Change::AmbiguousNearest { rule } => rule,
            Change::NewRule { name, .. } => name,
        }
    }

    /// One line a person reads.
    pub fn describe(&self) -> String {
        match self {
            Change::Normalize { rule, event, column, normalize, .. } => {
                format!("rule {rule:?}: normalize key {event} -> {column} with \"{}\"", normalizer_name(*normalize))
            }
            Change::Window { rule, before, after } => {
                let sides: Vec<String> = [("before", before), ("after", after)]
                    .into_iter()
                    .filter_map(|(side, m)| m.map(|m| format!("{side} = \"{m}m\"")))
                    .collect();
                format!("rule {rule:?}: widen the window to {}", sides.join(", "))
            }
            Change::DropKey { rule, event, column, .. } => format!("rule {rule:?}: drop key {event} -> {column}"),
            Change::NewRule { name, target, event, column, normalize, window } => {
                let norm =
                    normalize.map(|n| format!(" normalised with \"{}\"", normalizer_name(n))).unwrap_or_default();
                let window =
                    window.map(|(b, a)| format!(", window before = \"{b}m\", after = \"{a}m\"")).unwrap_or_default();
                format!("new {} rule {name:?}: {event} = {column}{norm}{window}", target.as_str())
            }
            Change::AmbiguousNearest { rule } => {
                format!("rule {rule:?}: ambiguous = \"nearest\" (take the nearest of tied calls)")
            }
        }
    }

    /// Derived from the change alone (its kind and one line), so the same change on the same data
    /// has the same id from run to run, whatever its rank.
    pub fn id(&self) -> String {
        use sha2::Digest as _;
        let digest = sha2::Sha256::digest(format!("{}\n{}", self.kind(), self.describe()).as_bytes());
        format!("s{}", &hex::encode(digest)[..8])
    }
}

/// The normaliser as the job file names it.
pub fn normalizer_name(n: Normalizer) -> &'static str {
    match n {
        Normalizer::Phone => "phone",
        Normalizer::Lower => "lower",
        Normalizer::Trim => "trim",
        Normalizer::Digits => "digits",
    }
}

/// Every normaliser, least changing first (the one kept when several agree equally often).
pub const NORMALIZERS: [Normalizer; 4] = [Normalizer::Trim, Normalizer::Lower, Normalizer::Digits, Normalizer::Phone];
