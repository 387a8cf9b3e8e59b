//! What every section's checks share: the file being read (for turning a
//! byte offset into a line), the unit conversions, and node references.

use std::collections::BTreeMap;
use std::time::Duration;

use toml::Spanned;

use super::model::ScenarioError;

/// Node names, in file order, to their index.
pub(super) type NodeNames = BTreeMap<String, usize>;

/// The file being checked: its name and text, for errors that point at a
/// line.
pub(super) struct Ctx<'a> {
    pub(super) file: &'a str,
    pub(super) text: &'a str,
}

impl Ctx<'_> {
    pub(super) fn line_of(&self, offset: usize) -> usize {
        self.text[..offset.min(self.text.len())]
            .bytes()
            .filter(|&b| b == b'\n')
            .count()
            + 1
    }

    pub(super) fn err(
        &self,
        offset: Option<usize>,
        field: Option<&str>,
        message: impl Into<String>,
    ) -> ScenarioError {
        ScenarioError {
            file: self.file.to_string(),
            line: offset.map(|o| self.line_of(o)),
            field: field.map(str::to_string),
            message: message.into(),
        }
    }

    pub(super) fn at<T>(
        &self,
        s: &Spanned<T>,
        field: &str,
        message: impl Into<String>,
    ) -> ScenarioError {
        self.err(Some(s.span().start), Some(field), message)
    }
}

/// Seconds from the file as a duration (negative counts as zero).
pub(super) fn secs(v: f64) -> Duration {
    Duration::from_secs_f64(v.max(0.0))
}

/// Milliseconds from the file as a duration (negative counts as zero).
pub(super) fn millis(v: f64) -> Duration {
    Duration::from_secs_f64(v.max(0.0) / 1000.0)
}

/// The node `s` names, or an error pointing at it as `field`.
pub(super) fn resolve_node(
    ctx: &Ctx<'_>,
    names: &NodeNames,
    s: &Spanned<String>,
    field: &str,
) -> Result<usize, ScenarioError> {
    names
        .get(s.get_ref())
        .copied()
        .ok_or_else(|| ctx.at(s, field, format!("unknown node {:?}", s.get_ref())))
}
