//! `GET /review/jobs/{job}/suggestions`: a job's suggested rule changes (`suggest::suggest`, as
//! `callrecon suggest` lists them), read-only. Accepting one stays an operator's step: the page
//! shows the command.

use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use minijinja::value::Serde;
use serde::Serialize;

use super::{Desk, failed, gate, query};
use crate::suggest;

/// One suggestion as the page shows it.
#[derive(Serialize)]
struct View<'s> {
    #[serde(flatten)]
    suggestion: &'s suggest::Suggestion,
    accept: String,
}

pub async fn page(State(desk): State<Desk>, headers: HeaderMap, uri: Uri, Path(job): Path<String>) -> Response {
    let analyst = match gate(&desk, &headers, &uri).await {
        Ok(a) => a,
        Err(resp) => return resp,
    };
    if let Err(bad) = query(&uri, &[]) {
        return bad.into_response();
    }
    let jobs = match desk.jobs().await {
        Ok(jobs) => jobs,
        Err(e) => return failed(&e),
    };
    let Some(job) = jobs.get(&job) else {
        return (StatusCode::NOT_FOUND, "no such job, or its job file cannot be read here").into_response();
    };
    let found = match suggest::suggest(&desk.pool, job, suggest::Scope::default(), suggest::MIN_SUPPORT).await {
        Ok(found) => found,
        Err(e) => return failed(&e),
    };
    let views: Vec<View> = found
        .suggestions
        .iter()
        .map(|s| View { suggestion: s, accept: suggest::accept_command(&job.path, None, None, &s.id) })
        .collect();
    let ctx = minijinja::context! {
        title => "Suggestions", analyst => analyst.name.as_str(), csrf => analyst.csrf.as_str(),
        job => job.name.as_str(), suggestions => Serde(&views), min_support => suggest::MIN_SUPPORT,
    };
    desk.render("suggestions.html", ctx)
}
