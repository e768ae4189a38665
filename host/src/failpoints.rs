//! Named pauses for fault tests: `WEIR_FAILPOINTS="upgrade.stopping=3s,…"`
//! makes the step at each named point wait that long, so a test can kill
//! the host, cancel the job or fail a subtask there for certain. Without
//! the variable (every deployment) each point is a lookup in an empty map.
//! The pause is an `await`: whoever polls the step sees everything else
//! meanwhile, exactly as during slow real work.

use std::collections::HashMap;
use std::sync::OnceLock;
use std::time::Duration;

fn points() -> &'static HashMap<String, Duration> {
    static POINTS: OnceLock<HashMap<String, Duration>> = OnceLock::new();
    POINTS.get_or_init(|| {
        std::env::var("WEIR_FAILPOINTS")
            .map(|text| parse(&text))
            .unwrap_or_default()
    })
}

/// `name=duration` pairs, comma separated; what does not parse is left
/// out (and logged).
fn parse(text: &str) -> HashMap<String, Duration> {
    text.split(',')
        .filter(|item| !item.trim().is_empty())
        .filter_map(|item| {
            let parsed = item.split_once('=').and_then(|(name, pause)| {
                Some((
                    name.trim().to_string(),
                    humantime::parse_duration(pause.trim()).ok()?,
                ))
            });
            if parsed.is_none() {
                tracing::warn!(item, "WEIR_FAILPOINTS: not name=duration; ignored");
            }
            parsed
        })
        .collect()
}

/// Pauses at the point `name` if the environment asks for it.
pub async fn pause(name: &str) {
    if let Some(pause) = points().get(name) {
        tracing::warn!(point = name, ?pause, "failpoint: pausing");
        tokio::time::sleep(*pause).await;
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn points_parse_as_name_and_duration() {
        let points = super::parse("upgrade.stopping=3s, upgrade.restoring = 250ms,bad,x=y");
        assert_eq!(points.len(), 2);
        assert_eq!(
            points["upgrade.stopping"],
            std::time::Duration::from_secs(3)
        );
        assert_eq!(
            points["upgrade.restoring"],
            std::time::Duration::from_millis(250)
        );
    }
}
