//! The review desk as analysts work it (issue 42), in headless Chromium and by HTTP: a tie is
//! never settled by a stray key, a decision moves on and is undone in one click, near misses
//! ranked and bounded, counts that follow the filters, bulk decisions, two analysts on one
//! queue, tables that fit 1400 px, and axe-core finding no serious or critical violation.

use std::time::Duration;

use reqwest::StatusCode;
use reqwest::header::LOCATION;
use serde_json::{Value, json};
use sqlx::PgPool;

use crate::helpers::*;
use crate::review::{Backlog, Browser, Desk, ELEMENT, MIGRATOR, analyst, backlog, event_state, unescape};

impl Browser {
    /// Signs `name` in on the sign-in page.
    async fn sign_in(&self, desk: &Desk, name: &str, secret: &str) {
        self.go(&format!("{}/review/login", desk.base)).await;
        self.type_in("#name", name).await;
        self.type_in("#secret", secret).await;
        self.click("#sign-in").await;
        self.find("#queue, #empty").await;
    }

    /// Clicks the element `css` with shift held (a range of checkboxes).
    async fn shift_click(&self, css: &str) {
        let e = self.find(css).await;
        let shift = "\u{E008}";
        let pause = json!({"type": "pause", "duration": 0});
        self.call(
            reqwest::Method::POST,
            "/actions",
            json!({"actions": [
                {"type": "key", "id": "kb", "actions": [{"type": "keyDown", "value": shift}, pause, pause, pause, {"type": "keyUp", "value": shift}]},
                {"type": "pointer", "id": "mouse", "parameters": {"pointerType": "mouse"}, "actions": [
                    pause, {"type": "pointerMove", "origin": {ELEMENT: e}, "x": 0, "y": 0},
                    {"type": "pointerDown", "button": 0}, {"type": "pointerUp", "button": 0}, pause]}
            ]}),
        )
        .await;
        self.call(reqwest::Method::DELETE, "/actions", Value::Null).await;
    }

    /// How many pixels the widest overflow sticks out: the page beyond the window, a table beyond
    /// its container, a scrolling box's content beyond the box (0: nothing overflows).
    async fn overflow(&self) -> f64 {
        let script = "var page = document.documentElement.scrollWidth - window.innerWidth;
            var tables = Array.prototype.map.call(document.querySelectorAll('table'), function (t) {
              return t.getBoundingClientRect().width - t.parentElement.getBoundingClientRect().width; });
            var boxes = Array.prototype.map.call(document.querySelectorAll('.scroll'), function (b) {
              return b.scrollWidth - b.clientWidth; });
            return Math.max.apply(null, [page].concat(tables, boxes));";
        self.execute(script, json!([])).await.as_f64().unwrap()
    }

    /// axe-core's serious and critical WCAG 2.1 A/AA violations on the page (`scripts/axe.sh`
    /// installs axe-core), each as `rule: elements`.
    async fn axe(&self, axe: &str) -> Vec<String> {
        self.execute(axe, json!([])).await;
        let run = r#"var done = arguments[arguments.length - 1];
            axe.run(document, {runOnly: {type: 'tag', values: ['wcag2a', 'wcag2aa', 'wcag21a', 'wcag21aa']}})
              .then(function (r) { done(r.violations.filter(function (v) { return v.impact === 'serious' || v.impact === 'critical'; })
                .map(function (v) { return v.id + ': ' + v.nodes.map(function (n) { return n.target.join(' '); }).join(', '); })); })
              .catch(function (e) { done(['axe failed: ' + e]); });"#;
        let v = self.call(reqwest::Method::POST, "/execute/async", json!({"script": run, "args": []})).await;
        v.as_array().unwrap().iter().map(|s| s.as_str().unwrap().to_owned()).collect()
    }
}

/// The source of axe-core's `axe.min.js`, installed by `scripts/axe.sh`.
fn axe_source() -> String {
    let root = env!("CARGO_MANIFEST_DIR");
    let out = std::process::Command::new("bash").arg(format!("{root}/scripts/axe.sh")).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    std::fs::read_to_string(String::from_utf8(out.stdout).unwrap().trim()).unwrap()
}

/// The pending events in the queue's order.
async fn queue_order(pool: &PgPool) -> Vec<i64> {
    sqlx::query_scalar("select id from events where state = 'pending' order by received_at, id")
        .fetch_all(pool)
        .await
        .unwrap()
}

async fn manual_history(pool: &PgPool, id: i64, by: &str) -> i64 {
    sqlx::query_scalar("select count(*) from event_history where event_id = $1 and person = $2")
        .bind(id)
        .bind(by)
        .fetch_one(pool)
        .await
        .unwrap()
}

/// The value of the hidden field `name` of the form `form_id` in `html`.
fn field(html: &str, form_id: &str, name: &str) -> String {
    let form = html.split(&format!("id=\"{form_id}\"")).nth(1).unwrap_or_else(|| panic!("form {form_id}"));
    let at = form.find(&format!("name=\"{name}\" value=\"")).unwrap_or_else(|| panic!("{name} in {form_id}"));
    let value = &form[at + name.len() + 15..];
    unescape(&value[..value.find('"').unwrap()])
}

#[sqlx::test(migrator = "MIGRATOR")]
async fn a_tie_is_never_settled_by_a_stray_key_and_a_decision_moves_on_with_undo(pool: PgPool) {
    let Backlog { job, tied, .. } = backlog(&pool, 2).await;
    let order = queue_order(&pool).await;
    let after_tied = order[order.iter().position(|id| *id == tied).unwrap() + 1];
    let desk = Desk::start(&pool, &job, Duration::from_secs(3600)).await;
    let secret = analyst(&pool, "ana").await;
    let browser = Browser::start().await;
    browser.sign_in(&desk, "ana", &secret).await;
    browser.go(&format!("{}/review/events/{tied}", desk.base)).await;
    browser.find("#rules").await;

    // Nothing chosen for the analyst; `a` asks which, and decides nothing.
    let checked =
        browser.execute("return document.querySelectorAll('input[name=to]:checked').length;", json!([])).await;
    assert_eq!(checked, 0);
    assert_eq!(browser.text("#decide #attach").await, "Attach to the chosen call");
    browser.press("a").await;
    assert!(browser.text("#choose").await.contains("Which call?"));
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(event_state(&pool, tied).await.0, "pending");
    assert!(browser.url().await.ends_with(&format!("/review/events/{tied}")));

    // `2` chooses the second of the tie, named on the button; `a` attaches to it, and the desk
    // goes on to the next event, saying what was done with an undo.
    let second = browser.execute("return document.querySelector('input[data-key=\"2\"]').value;", json!([])).await;
    let second = second.as_str().unwrap().strip_prefix("call:").unwrap().to_owned();
    browser.press("2").await;
    assert_eq!(browser.text("#attach").await, format!("Attach to {second}"));
    browser.press("a").await;
    browser.wait_url(&format!("/review/events/{after_tied}")).await;
    let msg = browser.wait_text("#msg", &format!("event {tied}: ")).await;
    assert!(msg.contains(&format!("matched call {second} by ana")), "{msg}");
    assert_eq!(event_state(&pool, tied).await, ("matched".to_owned(), Some(second.clone()), Some("ana".to_owned())));

    // Undo: one click, through reopen; back on the event, pending again.
    browser.click("#undo").await;
    browser.wait_url(&format!("/review/events/{tied}")).await;
    browser.wait_text("#msg", "-> pending").await;
    assert_eq!(event_state(&pool, tied).await, ("pending".to_owned(), None, None));
    assert_eq!(manual_history(&pool, tied, "ana").await, 2);

    // Decided again; its page says by whom and when, not the run that first saw it.
    browser.press("1").await;
    browser.press("a").await;
    browser.wait_url(&format!("/review/events/{after_tied}")).await;
    browser.go(&format!("{}/review/events/{tied}", desk.base)).await;
    let stored = browser.text("#stored").await;
    assert!(stored.contains("by hand, by ana") && stored.contains(" UTC"), "{stored}");
    assert!(!stored.contains("(run 1)"), "{stored}");
}

#[sqlx::test(migrator = "MIGRATOR")]
async fn two_analysts_see_each_others_claims_and_a_stale_decision_is_refused(pool: PgPool) {
    let b = backlog(&pool, 1).await;
    let desk = Desk::start(&pool, &b.job, Duration::from_secs(3600)).await;
    let ana = desk.sign_in("ana", &analyst(&pool, "ana").await).await.unwrap();
    let bob = desk.sign_in("bob", &analyst(&pool, "bob").await).await.unwrap();
    let path = format!("/review/events/{}", b.other_agent);
    let page = |who: &str| {
        let (desk, path, who) = (&desk, &path, who.to_owned());
        async move { desk.get(path, Some(&who)).await.text().await.unwrap() }
    };

    let ana_page = page(&ana).await;
    assert!(!ana_page.contains("id=\"claim\""), "no one else has it open");
    let bob_page = page(&bob).await;
    assert!(bob_page.contains("<b>ana</b> is on this"), "bob sees ana's claim");
    let queue = desk.get("/review", Some(&bob)).await.text().await.unwrap();
    assert!(queue.contains("ana is on this"), "and in the queue");
    let queue = desk.get("/review", Some(&ana)).await.text().await.unwrap();
    assert!(!queue.contains("is on this"), "ana's own claim is not shown to her");

    // bob attaches it; ana, on the page she loaded before, dismisses it: refused, saying what
    // changed, and bob's decision stands.
    let bob_csrf = field(&bob_page, "attach-form", "csrf");
    let form = [
        ("action", "attach"),
        ("to", "call:c-near"),
        ("csrf", &bob_csrf),
        ("seen", &field(&bob_page, "attach-form", "seen")),
    ];
    assert_eq!(desk.post(&path, Some(&bob), &form).await.status(), StatusCode::SEE_OTHER);
    let seen = field(&ana_page, "dismiss-form", "seen");
    assert_eq!(seen, "pending (no_candidate)");
    let csrf = field(&ana_page, "dismiss-form", "csrf");
    let form = [("action", "dismiss"), ("note", "junk"), ("csrf", &csrf), ("seen", &seen)];
    let resp = desk.post(&path, Some(&ana), &form).await;
    assert_eq!(resp.headers()[LOCATION], path.as_str(), "back to the event");
    let html = page(&ana).await;
    let error = html.split("id=\"error\">").nth(1).map(|s| unescape(&s[..s.find('<').unwrap()])).unwrap();
    assert!(error.contains("changed since its page was loaded"), "{error}");
    assert!(error.contains("now matched call c-near by bob"), "{error}");
    assert_eq!(
        event_state(&pool, b.other_agent).await,
        ("matched".to_owned(), Some("c-near".to_owned()), Some("bob".to_owned()))
    );

    // The same in a browser: cy opens the late event ana has open, sees her claim; ana dismisses
    // it; cy's attach from the page loaded before is refused on the page, saying what changed.
    let ana_page = desk.get(&format!("/review/events/{}", b.late), Some(&ana)).await.text().await.unwrap();
    let cy = analyst(&pool, "cy").await;
    let browser = Browser::start().await;
    browser.sign_in(&desk, "cy", &cy).await;
    browser.go(&format!("{}/review/events/{}", desk.base, b.late)).await;
    assert_eq!(browser.text("#claim").await, "ana is on this: they opened it in the last few minutes.");
    let form = [
        ("action", "dismiss"),
        ("note", "duplicate"),
        ("csrf", &field(&ana_page, "dismiss-form", "csrf")),
        ("seen", &field(&ana_page, "dismiss-form", "seen")),
    ];
    desk.post(&format!("/review/events/{}", b.late), Some(&ana), &form).await;
    browser.press("1a").await;
    let error = browser.wait_text("#error", "changed since its page was loaded").await;
    assert!(error.contains("now dismissed by ana (duplicate)"), "{error}");
    assert_eq!(event_state(&pool, b.late).await, ("dismissed".to_owned(), None, Some("ana".to_owned())));
}

#[sqlx::test(migrator = "MIGRATOR")]
async fn near_misses_are_ranked_by_keys_shared_then_distance_and_five_are_shown(pool: PgPool) {
    // Eight calls with the event's agent but another phone, from 20 minutes to 16 hours away,
    // and one with every key, three hours after its window closed.
    for i in 0..8 {
        let (start, end) = (format!("2026-11-02T{:02}:00:00Z", 5 + i), format!("2026-11-02T{:02}:05:00Z", 5 + i));
        Call::new(&format!("c-agent-{i}"), &start, Some(&end))
            .phone(&format!("555000000{i}"), "a1")
            .insert(&pool)
            .await;
    }
    Call::new("c-every-key", "2026-11-02T17:00:00Z", Some("2026-11-02T17:05:00Z"))
        .phone("5551230000", "a1")
        .insert(&pool)
        .await;
    let job = TestJob::new(RULES);
    enqueue(
        &pool,
        json!({"EventTime": "2026-11-02T13:50:00Z", "Metadata": {"customerPhone": "5551230000", "agentId": "a1"}}),
    )
    .await;
    job.run(&pool).await;
    let id: i64 = sqlx::query_scalar("select id from events").fetch_one(&pool).await.unwrap();
    let desk = Desk::start(&pool, &job, Duration::from_secs(3600)).await;
    let session = desk.sign_in("ana", &analyst(&pool, "ana").await).await.unwrap();
    let html = desk.get(&format!("/review/events/{id}"), Some(&session)).await.text().await.unwrap();
    let rule = html.split("id=\"rule-1\"").nth(1).unwrap();
    let rule = &rule[..rule.find("id=\"rule-2\"").unwrap_or(rule.len())];
    let (shown, more) = rule.split_once("<details class=\"more\">").expect("a show more");
    let listed = |part: &str| -> Vec<String> {
        part.split("data-to=\"call:").skip(1).map(|s| s[..s.find('"').unwrap()].to_owned()).collect()
    };
    let shown = listed(shown);
    assert_eq!(shown.len(), 5, "{shown:?}");
    assert_eq!(shown[0], "c-every-key", "every key, hours away, before any call sharing some keys");
    assert_eq!(listed(more).len(), 4);
    assert!(more.contains("show 4 more"));
    assert!(!html.contains(" checked"), "nothing chosen for the analyst");
}

#[sqlx::test(migrator = "MIGRATOR")]
async fn counts_follow_the_filters_and_every_reason_is_explained(pool: PgPool) {
    let b = backlog(&pool, 60).await;
    let desk = Desk::start(&pool, &b.job, Duration::from_secs(3600)).await;
    let session = desk.sign_in("ana", &analyst(&pool, "ana").await).await.unwrap();
    let total = |html: &str| html.split("<span id=\"total\">").nth(1).map(|s| s[..s.find('<').unwrap()].to_owned());
    let html = desk.get("/review", Some(&session)).await.text().await.unwrap();
    assert_eq!(total(&html).as_deref(), Some("64"));
    let html = desk.get("/review?q=123-0000", Some(&session)).await.text().await.unwrap();
    assert_eq!(total(&html).as_deref(), Some("1"));
    assert!(html.contains("data-reason=\"no_candidate\" href=\"/review?reason=no_candidate&amp;q=123-0000\"><b>1</b>"));
    assert!(!html.contains("data-reason=\"missing_key\""), "no tile for a reason the filters leave out");
    // A text in more events than a page shows: counted by reason, not from the page.
    let html = desk.get("/review?q=%22i%22", Some(&session)).await.text().await.unwrap();
    assert_eq!(total(&html).as_deref(), Some("60"));
    assert!(html.contains("data-reason=\"missing_key\" href=\"/review?reason=missing_key&amp;q=%22i%22\"><b>60</b>"));
    assert!(!html.contains("data-reason=\"no_candidate\""));
    let html = desk.get("/review?reason=missing_key", Some(&session)).await.text().await.unwrap();
    assert_eq!(total(&html).as_deref(), Some("60"));
    assert!(html.contains("<b>64</b>all reasons"));
    let explained = html.split("id=\"reason-help\">").nth(1).expect("the reasons explained");
    assert!(explained.contains("<dt><code>undecided</code></dt><dd>stored while a run had a backlog"), "{explained}");
}

#[sqlx::test(migrator = "MIGRATOR")]
async fn bulk_dismissal_of_a_filtered_set_records_the_analyst_on_every_event(pool: PgPool) {
    let b = backlog(&pool, 12).await;
    let junk: Vec<i64> =
        sqlx::query_scalar("select id from events where reason = 'missing_key' order by received_at, id")
            .fetch_all(&pool)
            .await
            .unwrap();
    let desk = Desk::start(&pool, &b.job, Duration::from_secs(3600)).await;
    let secret = analyst(&pool, "ana").await;
    let browser = Browser::start().await;
    browser.sign_in(&desk, "ana", &secret).await;
    browser.go(&format!("{}/review?reason=missing_key", desk.base)).await;
    assert_eq!(browser.find_all("#queue tbody tr").await.len(), 12);

    // A range: the first, then shift-click the fifth.
    browser.click(&format!("#pick-{}", junk[0])).await;
    browser.shift_click(&format!("#pick-{}", junk[4])).await;
    assert_eq!(browser.text("#bulk-count").await, "5 selected");
    browser.type_in("#bulk-note", "junk feed").await;
    browser.click("#bulk").await;
    assert_eq!(browser.wait_text("h1", "Dismiss").await, "Dismiss 5 events? job test");
    browser.click("#confirm").await;
    browser.wait_text("#msg", "5 events dismissed, by ana").await;
    for (i, id) in junk.iter().enumerate() {
        let expected = if i < 5 { "dismissed" } else { "pending" };
        assert_eq!(event_state(&pool, *id).await.0, expected, "event {id}");
    }

    // Then every one left matching the filter.
    assert_eq!(browser.find_all("#queue tbody tr").await.len(), 7);
    browser.click("#bulk-all").await;
    browser.type_in("#bulk-note", "junk feed").await;
    browser.click("#bulk").await;
    browser.wait_text("h1", "Dismiss 7 events?").await;
    browser.click("#confirm").await;
    browser.wait_text("#msg", "7 events dismissed, by ana").await;
    for id in &junk {
        assert_eq!(event_state(&pool, *id).await, ("dismissed".to_owned(), None, Some("ana".to_owned())));
        assert_eq!(manual_history(&pool, *id, "ana").await, 1, "event {id}");
    }
    assert_eq!(event_state(&pool, b.tied).await.0, "pending", "outside the filter");
}

#[sqlx::test(migrator = "MIGRATOR")]
async fn bulk_attach_takes_single_nearest_candidates_all_or_nothing(pool: PgPool) {
    let b = backlog(&pool, 1).await;
    let desk = Desk::start(&pool, &b.job, Duration::from_secs(3600)).await;
    let ana = desk.sign_in("ana", &analyst(&pool, "ana").await).await.unwrap();
    let bob = desk.sign_in("bob", &analyst(&pool, "bob").await).await.unwrap();
    let csrf = desk.csrf(&ana).await;
    let ids = [b.other_agent, b.late, b.tied].map(|id| id.to_string());
    let mut form: Vec<(&str, &str)> = vec![("csrf", &csrf), ("action", "attach")];
    form.extend(ids.iter().map(|id| ("id", id.as_str())));
    let resp = desk.post("/review/bulk", Some(&ana), &form).await;
    assert_eq!(resp.status(), StatusCode::OK);
    let confirm = resp.text().await.unwrap();
    // Only the late event has one call sharing every key; the others are listed as left out.
    assert!(confirm.contains("Attach 1 event to their nearest candidates?"), "{confirm}");
    assert!(confirm.contains("call:c-late"));
    assert!(confirm.contains(&format!("event {}: no single nearest candidate", b.tied)));
    assert!(confirm.contains(&format!("event {}: no single nearest candidate", b.other_agent)));

    // bob decides it meanwhile: ana's confirmation is refused whole.
    let bob_csrf = desk.csrf(&bob).await;
    let dismiss = [("action", "dismiss"), ("note", "test"), ("csrf", bob_csrf.as_str())];
    desk.post(&format!("/review/events/{}", b.late), Some(&bob), &dismiss).await;
    let late = b.late.to_string();
    let seen = field(&confirm, "confirm-form", "seen");
    let confirmed = [
        ("csrf", csrf.as_str()),
        ("action", "attach"),
        ("confirm", "yes"),
        ("id", late.as_str()),
        ("seen", seen.as_str()),
    ];
    assert_eq!(desk.post("/review/bulk", Some(&ana), &confirmed).await.status(), StatusCode::SEE_OTHER);
    let html = desk.get("/review", Some(&ana)).await.text().await.unwrap();
    assert!(html.contains("changed since its page was loaded"), "{html}");
    assert_eq!(event_state(&pool, b.late).await.2.as_deref(), Some("bob"));

    // Reopened, and confirmed again: attached, by ana.
    let reopen = [("action", "reopen"), ("csrf", bob_csrf.as_str())];
    desk.post(&format!("/review/events/{}", b.late), Some(&bob), &reopen).await;
    let resp =
        desk.post("/review/bulk", Some(&ana), &[("csrf", csrf.as_str()), ("action", "attach"), ("id", &late)]).await;
    let confirm = resp.text().await.unwrap();
    let seen = field(&confirm, "confirm-form", "seen");
    let confirmed = [
        ("csrf", csrf.as_str()),
        ("action", "attach"),
        ("confirm", "yes"),
        ("id", late.as_str()),
        ("seen", seen.as_str()),
    ];
    desk.post("/review/bulk", Some(&ana), &confirmed).await;
    assert_eq!(
        event_state(&pool, b.late).await,
        ("matched".to_owned(), Some("c-late".to_owned()), Some("ana".to_owned()))
    );
}

#[sqlx::test(migrator = "MIGRATOR")]
async fn every_desk_page_and_the_report_fit_1400_px_and_pass_axe_core(pool: PgPool) {
    // Long metadata from a file with a long name, and ties between calls with long ids, as the
    // issue's CRM export had them.
    let b = backlog(&pool, 0).await;
    for id in ["call-2026-11-02-0000000022", "call-2026-11-02-0000000028"] {
        Call::new(id, "2026-11-02T09:55:00Z", Some("2026-11-02T10:05:00Z"))
            .phone("2014522627", "agent-04")
            .insert(&pool)
            .await;
    }
    let long = json!({"EventTime": "2026-11-02T10:00:00Z", "Metadata": {
        "customerPhone": "+1 201-452-2627", "agentId": "agent-04", "crmAccountId": "A-66671",
        "disposition": "voicemail; customer asked for a callback after 5pm about the renewal of contract 2026-XK-99-000123",
        "customerName": "Müller-Lüdenscheidt", "notes": "x".repeat(300)}});
    let lines: Vec<String> = (0..3).map(|_| long.to_string()).collect();
    b.job.drop_file("crm-salesforce-nightly-export-2026-11-03-full.ndjson", &(lines.join("\n") + "\n"));
    b.job.run(&pool).await;
    let long_one: i64 = sqlx::query_scalar("select max(id) from events").fetch_one(&pool).await.unwrap();
    let desk = Desk::start(&pool, &b.job, Duration::from_secs(3600)).await;
    let secret = analyst(&pool, "ana").await;
    let axe = axe_source();
    let browser = Browser::start().await;
    browser.go(&format!("{}/review/login", desk.base)).await;
    browser.find("#name").await;
    assert_eq!(browser.axe(&axe).await, Vec::<String>::new(), "the sign-in page");
    browser.sign_in(&desk, "ana", &secret).await;

    let report = format!("{}/review/runs/2/report", desk.base);
    let pages = [
        format!("{}/review", desk.base),
        format!("{}/review/events/{}", desk.base, b.tied),
        format!("{}/review/events/{}", desk.base, b.other_agent),
        format!("{}/review/events/{long_one}", desk.base),
        format!("{}/review/runs", desk.base),
        report.clone(),
    ];
    for page in &pages {
        browser.go(page).await;
        browser.find("h1").await;
        let overflow = browser.overflow().await;
        assert!(overflow <= 0.5, "{page} overflows by {overflow} px");
        assert_eq!(browser.axe(&axe).await, Vec::<String>::new(), "{page}");
    }
    // The report's metadata column stays readable: a third of the table or more.
    browser.go(&report).await;
    let widths = browser
        .execute(
            "return [document.querySelector('#unmatched td.meta').getBoundingClientRect().width,
                     document.getElementById('unmatched').getBoundingClientRect().width];",
            json!([]),
        )
        .await;
    let (meta, table) = (widths[0].as_f64().unwrap(), widths[1].as_f64().unwrap());
    assert!(meta >= table / 3.0 && meta >= 400.0, "metadata {meta} px of {table} px");

    // The bulk confirmation too.
    browser.go(&format!("{}/review?reason=no_candidate", desk.base)).await;
    browser.click("#bulk-all").await;
    browser.type_in("#bulk-note", "junk").await;
    browser.click("#bulk").await;
    browser.wait_text("h1", "Dismiss").await;
    assert_eq!(browser.axe(&axe).await, Vec::<String>::new(), "the bulk confirmation");
}
