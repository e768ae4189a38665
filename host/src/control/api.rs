//! The HTTP/JSON control API. Handlers are thin: parse, call the job
//! manager or the plugin store, and map [`ControlError`] to a status code
//! in one place ([`IntoResponse`] below). Every request passes the bearer
//! token check when the host has a token. The OpenAPI document is derived
//! from the handlers' annotations and the types at `/api/openapi.json`, so
//! it cannot drift from the code: each operation lists every status its
//! handler answers and the constraints it checks (patterns, bounds), and a
//! host with a token adds the bearer requirement and its 401s. Whatever a
//! request gets wrong, including a path, query or body the extractors
//! cannot read and a method the route lacks, is answered with an
//! [`ErrorBody`] (tests/e2e/api_fuzz.rs fuzzes the API from the document).

use std::sync::Arc;

use axum::Json;
use axum::Router;
use axum::body::Body;
use axum::extract::{FromRequest, FromRequestParts, Path, Query, Request, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use utoipa::OpenApi;
use utoipa::openapi::{KnownFormat, ObjectBuilder, RefOr, Schema, SchemaFormat, Type};

use super::cluster::{Cluster, HostEntry, Hosts, Member};
use super::dashboard;
use super::jobs::{JobManager, RollBackRequest, SavepointRequest, SubmitRequest, UpgradeRequest};
use super::record::*;
use super::store::{StoreError, StoredPlugin};
use super::{ControlError, HostContext};
use crate::human::bytes;

#[derive(Clone)]
struct Api {
    ctx: Arc<HostContext>,
    jobs: Arc<JobManager>,
    /// This host's cluster membership, if any.
    cluster: Option<Arc<Cluster>>,
    /// Where this API listens.
    address: std::net::SocketAddr,
    /// When this host started.
    started_ms: u64,
}

/// The body of every error answer.
#[derive(Debug, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ErrorBody {
    /// What is wrong, naming the job, plugin, field or value at fault.
    #[schema(min_length = 1)]
    pub error: String,
    /// The HTTP status, repeated.
    #[schema(minimum = 400, maximum = 599)]
    pub status: u16,
}

impl ControlError {
    pub fn status(&self) -> StatusCode {
        match self {
            ControlError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ControlError::Unauthorized => StatusCode::UNAUTHORIZED,
            ControlError::NotFound(_) => StatusCode::NOT_FOUND,
            ControlError::MethodNotAllowed(_) => StatusCode::METHOD_NOT_ALLOWED,
            ControlError::Conflict(_) => StatusCode::CONFLICT,
            ControlError::TooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            ControlError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
            ControlError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            ControlError::Store(error) => match error {
                StoreError::TooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
                StoreError::Invalid(_) => StatusCode::BAD_REQUEST,
                StoreError::Conflict { .. } | StoreError::InUse { .. } => StatusCode::CONFLICT,
                StoreError::NotFound(_) => StatusCode::NOT_FOUND,
                StoreError::Storage(_) | StoreError::Index(_) => StatusCode::INTERNAL_SERVER_ERROR,
                StoreError::Cluster(_) => StatusCode::SERVICE_UNAVAILABLE,
            },
        }
    }
}

impl IntoResponse for ControlError {
    fn into_response(self) -> Response {
        let status = self.status();
        let mut response = (
            status,
            Json(ErrorBody {
                error: self.to_string(),
                status: status.as_u16(),
            }),
        )
            .into_response();
        if status == StatusCode::UNAUTHORIZED {
            response.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                header::HeaderValue::from_static("Bearer"),
            );
        }
        response
    }
}

type Answer<T> = Result<T, ControlError>;

/// A path parameter; one the router cannot read (not UTF-8) is a 400 with
/// an [`ErrorBody`] like every other bad request.
struct Param<T>(T);

impl<S: Send + Sync, T: DeserializeOwned + Send> FromRequestParts<S> for Param<T> {
    type Rejection = ControlError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Answer<Self> {
        let Path(value) = Path::<T>::from_request_parts(parts, state)
            .await
            .map_err(|e| ControlError::BadRequest(e.body_text()))?;
        Ok(Param(value))
    }
}

/// The query string, as [`Param`].
struct Params<T>(T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequestParts<S> for Params<T> {
    type Rejection = ControlError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Answer<Self> {
        let Query(value) = Query::<T>::from_request_parts(parts, state)
            .await
            .map_err(|e| ControlError::BadRequest(e.body_text()))?;
        Ok(Params(value))
    }
}

/// A JSON request body (`Content-Type: application/json`), as [`Param`].
struct JsonBody<T>(T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for JsonBody<T> {
    type Rejection = ControlError;

    async fn from_request(request: Request, state: &S) -> Answer<Self> {
        let Json(value) = Json::<T>::from_request(request, state)
            .await
            .map_err(|e| ControlError::BadRequest(e.body_text()))?;
        Ok(JsonBody(value))
    }
}

/// The API's routes, token-checked.
pub fn router(
    ctx: Arc<HostContext>,
    jobs: Arc<JobManager>,
    cluster: Option<Arc<Cluster>>,
    address: std::net::SocketAddr,
) -> Router {
    let api = Api {
        ctx,
        jobs,
        cluster,
        address,
        started_ms: super::now_ms(),
    };
    Router::new()
        .route("/api/openapi.json", get(openapi))
        .route("/api/health", get(health))
        .route("/api/hosts", get(list_hosts))
        .route("/api/plugins", get(list_plugins).post(add_plugin))
        .route("/api/plugins/{reference}", delete(remove_plugin))
        .route("/api/jobs", get(list_jobs).post(submit_job))
        .route("/api/jobs/{id}", get(job_detail))
        .route("/api/jobs/{id}/cancel", post(cancel_job))
        .route("/api/jobs/{id}/stop", post(stop_job))
        .route(
            "/api/jobs/{id}/savepoints",
            get(list_savepoints).post(trigger_savepoint),
        )
        .route("/api/jobs/{id}/upgrade", post(upgrade_job))
        .route("/api/jobs/{id}/fork", post(fork_job))
        .route("/api/jobs/{id}/operations/{operation}", get(operation))
        .route(
            "/api/jobs/{id}/operations/{operation}/release",
            post(release_upgrade),
        )
        .route(
            "/api/jobs/{id}/operations/{operation}/roll-back",
            post(roll_back_upgrade),
        )
        .route("/metrics", get(metrics))
        .route("/", get(dashboard::index))
        .route("/dashboard/{asset}", get(dashboard::asset))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(axum::extract::DefaultBodyLimit::disable())
        .layer(middleware::from_fn_with_state(api.clone(), forward))
        .layer(middleware::from_fn_with_state(api.clone(), authorize))
        .with_state(api)
}

async fn not_found(request: Request) -> ControlError {
    ControlError::NotFound(format!(
        "no such endpoint: {} {}",
        request.method(),
        request.uri().path()
    ))
}

/// A method the route does not have (axum adds the `Allow` header).
async fn method_not_allowed(request: Request) -> ControlError {
    ControlError::MethodNotAllowed(format!(
        "{} is not allowed on {}",
        request.method(),
        request.uri().path()
    ))
}

/// Checks `Authorization: Bearer <token>` when the host has a token.
async fn authorize(State(api): State<Api>, request: Request, next: Next) -> Response {
    // The dashboard's page and assets hold no data; the page then asks
    // the API with the token.
    let path = request.uri().path();
    let open = path == "/" || path.starts_with("/dashboard/");
    if let Some(token) = api.ctx.settings.token.as_ref().filter(|_| !open) {
        let given = request
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .unwrap_or("");
        if !same(given.as_bytes(), token.as_bytes()) {
            return ControlError::Unauthorized.into_response();
        }
    }
    next.run(request).await
}

/// The header a forwarded request carries (the forwarding host's id): a
/// host never forwards such a request again.
pub(super) const FORWARDED_BY: &str = "x-weir-forwarded-by";

/// In a cluster, a request about a job another host runs goes to that
/// host, and its answer comes back as is: any host answers for any job.
async fn forward(State(api): State<Api>, request: Request, next: Next) -> Response {
    let Some(directory) = api.cluster.as_ref().and_then(|c| c.jobs()) else {
        return next.run(request).await;
    };
    let id = match request.uri().path().strip_prefix("/api/jobs/") {
        Some(rest) => rest.split('/').next().unwrap_or("").to_string(),
        None => return next.run(request).await,
    };
    if api.jobs.contains(&id) || request.headers().contains_key(FORWARDED_BY) {
        return next.run(request).await;
    }
    let entry = match directory.find(&id).await {
        Ok(Some(entry)) if entry.host != directory.host() => entry,
        Ok(Some(_)) => return next.run(request).await,
        Ok(None) => {
            // A staged job: no host runs it as one, this host answers.
            let Some(store) = api.cluster.as_ref().and_then(|c| c.assignments()) else {
                return next.run(request).await;
            };
            let store = store.staged();
            let staged = match store.get(&id).await {
                Ok(Some(staged)) => staged,
                Ok(None) => return next.run(request).await,
                Err(error) => return ControlError::Unavailable(error.to_string()).into_response(),
            };
            let (parts, body) = request.into_parts();
            let Ok(body) = axum::body::to_bytes(body, 1 << 20).await else {
                return ControlError::TooLarge("a request about a staged job: over 1 MiB".into())
                    .into_response();
            };
            let rest = &parts.uri.path()["/api/jobs/".len() + id.len()..];
            let Some(cluster) = api.cluster.clone() else {
                return ControlError::Internal("a staged job without a cluster".into())
                    .into_response();
            };
            let place = super::staged::Place {
                storage: cluster.job_storage(&id),
                directory: directory.clone(),
                store,
                cluster,
            };
            return super::staged::answer(place, staged, &parts.method, rest, &parts.headers, body)
                .await;
        }
        Err(error) => return ControlError::Unavailable(error.to_string()).into_response(),
    };
    let (parts, body) = request.into_parts();
    let Ok(body) = axum::body::to_bytes(body, 64 << 20).await else {
        return ControlError::TooLarge("a request forwarded to another host: over 64 MiB".into())
            .into_response();
    };
    let path = parts.uri.path_and_query().map_or("", |p| p.as_str());
    let url = format!("{}{path}", entry.api);
    static CLIENT: std::sync::OnceLock<reqwest::Client> = std::sync::OnceLock::new();
    let client = CLIENT.get_or_init(reqwest::Client::new);
    let mut outgoing = client
        .request(parts.method.clone(), &url)
        .header(FORWARDED_BY, directory.host())
        .body(body);
    for name in [header::AUTHORIZATION, header::CONTENT_TYPE] {
        if let Some(value) = parts.headers.get(&name) {
            outgoing = outgoing.header(name, value);
        }
    }
    let answer = async {
        let response = outgoing.send().await?;
        let status = response.status();
        let content_type = response.headers().get(header::CONTENT_TYPE).cloned();
        let bytes = response.bytes().await?;
        Ok::<_, reqwest::Error>((status, content_type, bytes))
    };
    match answer.await {
        Ok((status, content_type, bytes)) => {
            let mut response = (status, bytes).into_response();
            if let Some(value) = content_type {
                response.headers_mut().insert(header::CONTENT_TYPE, value);
            }
            response
        }
        Err(error) => ControlError::Unavailable(format!(
            "job {id} runs on host `{}` at {}, which does not answer: {error}",
            entry.host, entry.api
        ))
        .into_response(),
    }
}

/// Compares in time independent of where the first difference is.
fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[derive(OpenApi)]
#[openapi(
    info(
        title = "Weir control API",
        description = "The running host: plugin store, jobs, savepoints, hot upgrades."
    ),
    paths(
        health,
        list_hosts,
        metrics,
        list_plugins,
        add_plugin,
        remove_plugin,
        list_jobs,
        submit_job,
        job_detail,
        cancel_job,
        stop_job,
        trigger_savepoint,
        list_savepoints,
        upgrade_job,
        fork_job,
        operation,
        release_upgrade,
        roll_back_upgrade
    ),
    components(schemas(ErrorBody, Health)),
    modifiers(&BearerAuth)
)]
struct ApiDoc;

struct BearerAuth;

impl utoipa::Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
        );
    }
}

/// The OpenAPI 3 document of this API, for a host without a token.
pub fn openapi_document() -> utoipa::openapi::OpenApi {
    ApiDoc::openapi()
}

/// The document of a host with a token: every operation requires the
/// bearer token and may answer 401.
pub fn openapi_document_with_token() -> utoipa::openapi::OpenApi {
    use utoipa::openapi::security::SecurityRequirement;
    use utoipa::openapi::{ContentBuilder, ResponseBuilder};
    let mut document = openapi_document();
    document.security = Some(vec![SecurityRequirement::new(
        "bearer",
        Vec::<String>::new(),
    )]);
    let unauthorized = ResponseBuilder::new()
        .description("missing or wrong bearer token")
        .content(
            "application/json",
            ContentBuilder::new()
                .schema(Some(RefOr::Ref(utoipa::openapi::Ref::from_schema_name(
                    "ErrorBody",
                ))))
                .build(),
        )
        .build();
    for item in document.paths.paths.values_mut() {
        let operations = [
            &mut item.get,
            &mut item.put,
            &mut item.post,
            &mut item.delete,
            &mut item.patch,
        ];
        for operation in operations.into_iter().flatten() {
            operation
                .responses
                .responses
                .insert("401".to_string(), unauthorized.clone().into());
        }
    }
    document
}

async fn openapi(State(api): State<Api>) -> Json<utoipa::openapi::OpenApi> {
    Json(match api.ctx.settings.token {
        Some(_) => openapi_document_with_token(),
        None => openapi_document(),
    })
}

/// A plugin file in a request body: the component's bytes.
struct ComponentFile;

impl utoipa::PartialSchema for ComponentFile {
    fn schema() -> RefOr<Schema> {
        ObjectBuilder::new()
            .schema_type(Type::String)
            .format(Some(SchemaFormat::KnownFormat(KnownFormat::Binary)))
            .into()
    }
}

impl utoipa::ToSchema for ComponentFile {}

#[derive(Debug, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Health {
    pub status: String,
    pub version: String,
    pub jobs: usize,
    pub plugins: usize,
}

/// Every job's and the host's metrics in the Prometheus (OpenMetrics)
/// text format: records and bytes, busy/idle/back-pressured time, plugin
/// time, watermarks, keyed state, checkpoints, restarts and failures by
/// kind, upgrades and rollbacks, jobs by status, plugins.
#[utoipa::path(
    get,
    path = "/metrics",
    responses((status = 200, content_type = "application/openmetrics-text", body = String))
)]
async fn metrics(State(api): State<Api>) -> impl IntoResponse {
    (
        [(
            axum::http::header::CONTENT_TYPE,
            crate::prometheus::CONTENT_TYPE,
        )],
        api.jobs.prometheus(),
    )
}

/// The host is up.
#[utoipa::path(get, path = "/api/health", responses((status = 200, body = Health)))]
async fn health(State(api): State<Api>) -> Json<Health> {
    Json(Health {
        status: "ok".to_string(),
        version: env!("CARGO_PKG_VERSION").to_string(),
        jobs: api.jobs.list().len(),
        plugins: api.ctx.store.list().len(),
    })
}

/// The hosts of this host's cluster, the coordinator first among equals
/// (each with its API, version and jobs); a host on its own lists itself.
#[utoipa::path(
    get,
    path = "/api/hosts",
    responses(
        (status = 200, body = Hosts),
        (status = 503, description = "the cluster's NATS does not answer", body = ErrorBody)
    )
)]
async fn list_hosts(State(api): State<Api>) -> Answer<Json<Hosts>> {
    if let Some(cluster) = &api.cluster {
        return cluster
            .hosts()
            .await
            .map(Json)
            .map_err(|e| ControlError::Unavailable(e.to_string()));
    }
    let (jobs, running) = api.jobs.load();
    let now = super::now_ms();
    Ok(Json(Hosts {
        cluster: None,
        coordinator: None,
        hosts: vec![HostEntry {
            member: Member {
                id: "local".to_string(),
                api: format!("http://{}", api.address),
                version: super::cluster::VERSION.to_string(),
                instance: String::new(),
                started_ms: api.started_ms,
                renewed_ms: now,
                jobs,
                running,
            },
            coordinator: false,
            this: true,
        }],
    }))
}

/// A stored plugin with the live jobs that use it.
#[derive(Debug, Serialize, Deserialize, utoipa::ToSchema)]
pub struct PluginEntry {
    #[serde(flatten)]
    pub plugin: StoredPlugin,
    pub jobs: Vec<String>,
}

/// Every plugin in the store.
#[utoipa::path(get, path = "/api/plugins", responses((status = 200, body = [PluginEntry])))]
async fn list_plugins(State(api): State<Api>) -> Json<Vec<PluginEntry>> {
    let mut users = api.jobs.users();
    Json(
        api.ctx
            .store
            .list()
            .into_iter()
            .map(|plugin| PluginEntry {
                jobs: users.remove(&plugin.digest).unwrap_or_default(),
                plugin,
            })
            .collect(),
    )
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
struct UploadQuery {
    /// The file's name, for messages.
    file: Option<String>,
}

/// Uploads a component (the request body, whatever its content type):
/// validated, precompiled, stored. 201 when new, 200 when the same file
/// was there already.
#[utoipa::path(
    post,
    path = "/api/plugins",
    params(UploadQuery),
    request_body(content(
        (inline(ComponentFile) = "application/wasm"),
        (inline(ComponentFile) = "application/octet-stream")
    )),
    responses(
        (status = 201, body = StoredPlugin),
        (status = 200, body = StoredPlugin),
        (status = 400, body = ErrorBody, description = "not a valid plugin (or an unreadable query)"),
        (status = 409, body = ErrorBody, description = "another file under this name@version"),
        (status = 413, body = ErrorBody, description = "larger than the limit"),
        (status = 503, body = ErrorBody, description = "in a cluster: its NATS did not take the plugin"),
    )
)]
async fn add_plugin(
    State(api): State<Api>,
    Params(query): Params<UploadQuery>,
    headers: HeaderMap,
    body: Body,
) -> Answer<(StatusCode, Json<StoredPlugin>)> {
    let file = query
        .file
        .unwrap_or_else(|| "the uploaded plugin".to_string());
    let limit = api.ctx.store.max_bytes;
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    let too_large = |size: Option<u64>| {
        ControlError::TooLarge(match size {
            Some(size) => format!(
                "{file}: {} exceeds the plugin size limit of {}",
                bytes(size),
                bytes(limit)
            ),
            None => format!("{file}: exceeds the plugin size limit of {}", bytes(limit)),
        })
    };
    if declared.is_some_and(|size| size > limit) {
        return Err(too_large(declared));
    }
    let body = axum::body::to_bytes(body, limit as usize)
        .await
        .map_err(|_| too_large(declared))?;
    let shared = api.cluster.as_ref().and_then(|c| c.plugins());
    let (plugin, created) =
        super::cluster::plugins::add(&api.ctx.store, shared.as_deref(), file, body).await?;
    let status = if created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok((status, Json(plugin)))
}

/// Removes `NAME@VERSION` from the store (409 while a live job uses it).
#[utoipa::path(
    delete,
    path = "/api/plugins/{reference}",
    params(("reference" = String, Path, description = "NAME@VERSION", pattern = "@")),
    responses(
        (status = 200, body = StoredPlugin),
        (status = 400, body = ErrorBody, description = "not NAME@VERSION"),
        (status = 404, body = ErrorBody),
        (status = 409, body = ErrorBody, description = "a job uses it"),
        (status = 503, body = ErrorBody, description = "in a cluster: its NATS did not take the withdrawal"),
    )
)]
async fn remove_plugin(
    State(api): State<Api>,
    Param(reference): Param<String>,
) -> Answer<Json<StoredPlugin>> {
    if !reference.contains('@') {
        return Err(ControlError::BadRequest(format!(
            "`{reference}`: name the plugin as NAME@VERSION"
        )));
    }
    let jobs = api.jobs.clone();
    let removed = api
        .ctx
        .store
        .remove(&reference, |digest| jobs.users_of(digest))?;
    if let Some(shared) = api.cluster.as_ref().and_then(|c| c.plugins()) {
        shared.withdraw(&reference).await?;
    }
    Ok(Json(removed))
}

/// Every job, newest first: in a cluster, every host's (each naming its
/// host).
#[utoipa::path(
    get,
    path = "/api/jobs",
    responses(
        (status = 200, body = [JobSummary]),
        (status = 503, body = ErrorBody, description = "in a cluster: its NATS does not answer")
    )
)]
async fn list_jobs(State(api): State<Api>) -> Answer<Json<Vec<JobSummary>>> {
    let mut list = api.jobs.list();
    let Some(directory) = api.cluster.as_ref().and_then(|c| c.jobs()) else {
        return Ok(Json(list));
    };
    let this = directory.host().to_string();
    for job in &mut list {
        job.host = Some(this.clone());
        job.host_live = Some(true);
    }
    let unavailable = |e: super::cluster::ClusterError| ControlError::Unavailable(e.to_string());
    let entries = directory.list().await.map_err(unavailable)?;
    let live: Vec<String> = match &api.cluster {
        Some(cluster) => cluster
            .hosts()
            .await
            .map_err(unavailable)?
            .hosts
            .into_iter()
            .map(|h| h.member.id)
            .collect(),
        None => Vec::new(),
    };
    // A job whose host is not live shows its last known status; one this
    // host runs (adopted from another) is listed once, as it runs here.
    let local: Vec<String> = list.iter().map(|j| j.id.clone()).collect();
    list.extend(
        entries
            .into_iter()
            .filter(|entry| entry.host != this && !local.contains(&entry.summary.id))
            .map(|entry| JobSummary {
                stages: Vec::new(),
                host_live: Some(live.contains(&entry.host)),
                host: Some(entry.host),
                ..entry.summary
            }),
    );
    if let Some(assignments) = api.cluster.as_ref().and_then(|c| c.assignments()) {
        let staged = super::staged::summaries(&assignments.staged(), &list).await?;
        list.extend(staged);
    }
    list.sort_by_key(|job| std::cmp::Reverse(job.submitted_ms));
    Ok(Json(list))
}

/// Submits a job file; it starts at once.
#[utoipa::path(
    post,
    path = "/api/jobs",
    request_body = SubmitRequest,
    responses(
        (status = 201, body = JobRecord),
        (status = 400, body = ErrorBody, description = "not a request of this shape, or the job file is invalid (its TOML, its settings, plugins missing from the store, a savepoint it cannot restore)"),
    )
)]
async fn submit_job(
    State(api): State<Api>,
    JsonBody(request): JsonBody<SubmitRequest>,
) -> Answer<(StatusCode, Json<JobRecord>)> {
    Ok((StatusCode::CREATED, Json(api.jobs.submit(request).await?)))
}

/// A job: its record (status, history, operations, savepoints, upgrades)
/// and its current run (operators, checkpoints).
#[utoipa::path(
    get,
    path = "/api/jobs/{id}",
    params(("id" = String, Path)),
    responses(
        (status = 200, body = JobDetail),
        (status = 400, body = ErrorBody, description = "an unreadable path"),
        (status = 404, body = ErrorBody),
    )
)]
async fn job_detail(State(api): State<Api>, Param(id): Param<String>) -> Answer<Json<JobDetail>> {
    Ok(Json(api.jobs.detail(&id)?))
}

fn accepted(operation: Operation) -> (StatusCode, Json<Operation>) {
    (StatusCode::ACCEPTED, Json(operation))
}

/// An optional JSON body: empty or `null` means the defaults.
fn body<T: Default + DeserializeOwned>(bytes: &[u8]) -> Answer<T> {
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Ok(T::default());
    }
    serde_json::from_slice::<Option<T>>(bytes)
        .map(Option::unwrap_or_default)
        .map_err(|e| {
            ControlError::BadRequest(format!("the request body is not valid JSON for it: {e}"))
        })
}

/// Cancels a job (202; follow the operation).
#[utoipa::path(
    post,
    path = "/api/jobs/{id}/cancel",
    params(("id" = String, Path)),
    responses(
        (status = 202, body = Operation),
        (status = 400, body = ErrorBody, description = "an unreadable path"),
        (status = 404, body = ErrorBody),
        (status = 409, body = ErrorBody, description = "the job ended or another operation runs"),
    )
)]
async fn cancel_job(
    State(api): State<Api>,
    Param(id): Param<String>,
) -> Answer<(StatusCode, Json<Operation>)> {
    Ok(accepted(api.jobs.cancel(&id)?))
}

/// Stops a job with a savepoint (202; follow the operation).
#[utoipa::path(
    post,
    path = "/api/jobs/{id}/stop",
    params(("id" = String, Path)),
    request_body(content = Option<SavepointRequest>, description = "optional: empty means the defaults"),
    responses(
        (status = 202, body = Operation),
        (status = 400, body = ErrorBody, description = "the body is not JSON of this shape"),
        (status = 404, body = ErrorBody),
        (status = 409, body = ErrorBody, description = "the job is not running or another operation runs"),
    )
)]
async fn stop_job(
    State(api): State<Api>,
    Param(id): Param<String>,
    request: axum::body::Bytes,
) -> Answer<(StatusCode, Json<Operation>)> {
    Ok(accepted(api.jobs.stop(&id, &body(&request)?)?))
}

/// Takes a savepoint; the job runs on (202; follow the operation).
#[utoipa::path(
    post,
    path = "/api/jobs/{id}/savepoints",
    params(("id" = String, Path)),
    request_body(content = Option<SavepointRequest>, description = "optional: empty means the defaults"),
    responses(
        (status = 202, body = Operation),
        (status = 400, body = ErrorBody, description = "the body is not JSON of this shape"),
        (status = 404, body = ErrorBody),
        (status = 409, body = ErrorBody, description = "the job is not running or another operation runs"),
    )
)]
async fn trigger_savepoint(
    State(api): State<Api>,
    Param(id): Param<String>,
    request: axum::body::Bytes,
) -> Answer<(StatusCode, Json<Operation>)> {
    Ok(accepted(api.jobs.savepoint(&id, &body(&request)?)?))
}

/// The savepoints the host took of a job.
#[utoipa::path(
    get,
    path = "/api/jobs/{id}/savepoints",
    params(("id" = String, Path)),
    responses(
        (status = 200, body = [SavepointRecord]),
        (status = 400, body = ErrorBody, description = "an unreadable path"),
        (status = 404, body = ErrorBody),
    )
)]
async fn list_savepoints(
    State(api): State<Api>,
    Param(id): Param<String>,
) -> Answer<Json<Vec<SavepointRecord>>> {
    Ok(Json(api.jobs.savepoints(&id)?))
}

/// Hot-upgrades a job (202; follow the operation): checked against the
/// newest checkpoint, stopped with a savepoint, restarted with the new
/// plugins on probation, rolled back if it fails.
#[utoipa::path(
    post,
    path = "/api/jobs/{id}/upgrade",
    params(("id" = String, Path)),
    request_body = UpgradeRequest,
    responses(
        (status = 202, body = Operation),
        (status = 400, body = ErrorBody, description = "not a request of this shape, or one the job cannot take (unknown uids, a parallelism above max_parallelism, plugins missing from the store, nothing changes)"),
        (status = 404, body = ErrorBody),
        (status = 409, body = ErrorBody, description = "the job is not running or another operation runs"),
    )
)]
async fn upgrade_job(
    State(api): State<Api>,
    Param(id): Param<String>,
    JsonBody(request): JsonBody<UpgradeRequest>,
) -> Answer<(StatusCode, Json<Operation>)> {
    Ok(accepted(api.jobs.upgrade(&id, request)?))
}

/// Forks a job: takes a savepoint of it (it runs on, keeping its output)
/// and starts a second job from it with the changes asked for, whose
/// sinks must write elsewhere; answers the fork's record once it started.
#[utoipa::path(
    post,
    path = "/api/jobs/{id}/fork",
    params(("id" = String, Path)),
    request_body = super::fork::ForkRequest,
    responses(
        (status = 201, body = JobRecord),
        (status = 400, body = ErrorBody, description = "not a request of this shape, or one the fork cannot take (its job file invalid, plugins missing from the store, a sink writing where one of the job's does)"),
        (status = 404, body = ErrorBody),
        (status = 409, body = ErrorBody, description = "the job is not running, another operation runs, or its savepoint failed"),
    )
)]
async fn fork_job(
    State(api): State<Api>,
    Param(id): Param<String>,
    JsonBody(request): JsonBody<super::fork::ForkRequest>,
) -> Answer<(StatusCode, Json<JobRecord>)> {
    Ok((
        StatusCode::CREATED,
        Json(api.jobs.fork(&id, request).await?),
    ))
}

/// One operation of a job (kept as long as the job).
#[utoipa::path(
    get,
    path = "/api/jobs/{id}/operations/{operation}",
    params(("id" = String, Path), ("operation" = String, Path)),
    responses(
        (status = 200, body = Operation),
        (status = 400, body = ErrorBody, description = "an unreadable path"),
        (status = 404, body = ErrorBody),
    )
)]
async fn operation(
    State(api): State<Api>,
    Param((id, operation)): Param<(String, String)>,
) -> Answer<Json<Operation>> {
    Ok(Json(api.jobs.operation(&id, &operation)?))
}

/// Releases an upgrade that awaits release (asked with `await_release`,
/// its probation passed): its held commits go out (202).
#[utoipa::path(
    post,
    path = "/api/jobs/{id}/operations/{operation}/release",
    params(("id" = String, Path), ("operation" = String, Path)),
    responses(
        (status = 202, body = Operation),
        (status = 400, body = ErrorBody, description = "an unreadable path"),
        (status = 404, body = ErrorBody),
        (status = 409, body = ErrorBody, description = "not an upgrade awaiting release"),
    )
)]
async fn release_upgrade(
    State(api): State<Api>,
    Param((id, operation)): Param<(String, String)>,
) -> Answer<(StatusCode, Json<Operation>)> {
    Ok(accepted(api.jobs.verdict(&id, &operation, true, None)?))
}

/// Rolls back an upgrade under way (202): before the old version stopped
/// the upgrade ends there, the job untouched; after, the previous version
/// restarts from the upgrade's savepoint as soon as the new one restored,
/// without a probation.
#[utoipa::path(
    post,
    path = "/api/jobs/{id}/operations/{operation}/roll-back",
    params(("id" = String, Path), ("operation" = String, Path)),
    request_body(content = Option<RollBackRequest>, description = "optional: why"),
    responses(
        (status = 202, body = Operation),
        (status = 400, body = ErrorBody, description = "the body is not JSON of this shape"),
        (status = 404, body = ErrorBody),
        (status = 409, body = ErrorBody, description = "not an upgrade under way (over, or rolling back already)"),
    )
)]
async fn roll_back_upgrade(
    State(api): State<Api>,
    Param((id, operation)): Param<(String, String)>,
    request: axum::body::Bytes,
) -> Answer<(StatusCode, Json<Operation>)> {
    let request: RollBackRequest = body(&request)?;
    Ok(accepted(api.jobs.verdict(
        &id,
        &operation,
        false,
        request.reason,
    )?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_openapi_document_lists_every_route() {
        let document = serde_json::to_value(openapi_document()).expect("serialize");
        let paths = document["paths"].as_object().expect("paths");
        for path in [
            "/api/plugins",
            "/api/plugins/{reference}",
            "/api/jobs",
            "/api/jobs/{id}",
            "/api/jobs/{id}/upgrade",
            "/api/jobs/{id}/fork",
            "/api/jobs/{id}/savepoints",
            "/api/jobs/{id}/operations/{operation}",
            "/api/jobs/{id}/operations/{operation}/release",
            "/api/jobs/{id}/operations/{operation}/roll-back",
            "/api/hosts",
            "/metrics",
        ] {
            assert!(paths.contains_key(path), "{path} missing");
        }
        assert!(
            document["components"]["schemas"]["JobStatus"].is_object(),
            "schemas are derived from the types"
        );
        assert!(
            document["components"]["schemas"]["StageView"].is_object(),
            "a staged job's stages are described"
        );
    }

    #[test]
    fn a_host_with_a_token_documents_it_on_every_operation() {
        let without = serde_json::to_value(openapi_document()).expect("serialize");
        assert!(without.get("security").is_none(), "{}", without["security"]);
        let with = serde_json::to_value(openapi_document_with_token()).expect("serialize");
        assert_eq!(with["security"], serde_json::json!([{"bearer": []}]));
        let mut operations = 0;
        for (path, item) in with["paths"].as_object().expect("paths") {
            for (method, operation) in item.as_object().expect("path item") {
                operations += 1;
                assert!(
                    operation["responses"]["401"].is_object(),
                    "{method} {path} lacks its 401"
                );
                assert!(
                    without["paths"][path][method]["responses"]
                        .get("401")
                        .is_none(),
                    "{method} {path}: a host without a token never answers 401"
                );
            }
        }
        assert_eq!(operations, 18, "every operation");
    }

    #[test]
    fn the_document_states_what_the_handlers_check() {
        let document = serde_json::to_value(openapi_document()).expect("serialize");
        let remove = &document["paths"]["/api/plugins/{reference}"]["delete"];
        assert_eq!(remove["parameters"][0]["schema"]["pattern"], "@");
        assert!(remove["responses"]["400"].is_object());
        let upload = &document["paths"]["/api/plugins"]["post"];
        assert_eq!(upload["parameters"][0]["in"], "query", "{upload}");
        let schemas = &document["components"]["schemas"];
        assert_eq!(
            schemas["SubmitRequest"]["properties"]["base_dir"]["pattern"],
            "^/"
        );
        let parallelism = &schemas["UpgradeRequest"]["properties"]["parallelism"];
        assert_eq!(
            parallelism["additionalProperties"]["minimum"], 1,
            "{parallelism}"
        );
        for path in ["/api/jobs/{id}/stop", "/api/jobs/{id}/savepoints"] {
            let body = &document["paths"][path]["post"]["requestBody"];
            assert_ne!(body["required"], true, "{path}: the body is optional");
        }
    }

    #[test]
    fn token_comparison_needs_the_whole_token() {
        assert!(same(b"secret", b"secret"));
        assert!(!same(b"secre", b"secret"));
        assert!(!same(b"secreT", b"secret"));
    }
}
