//! The fleet catalog's DynamoDB table, as archctl reaches it.
//!
//! A crate of its own so that arch-runc, which starts on every runc call and
//! never talks to the network, neither links nor starts the AWS SDK: only
//! `archctl` (watch's shipper, `fleet create-table`, `list --fleet`,
//! `inspect --fleet`) calls into it.
//!
//! [`Table`] is what the host needs of the table, so the shipper's unit
//! tests substitute a fake; [`Dynamo`] is the real one. The SDK is async;
//! [`Dynamo`] hides that behind its own current-thread runtime, so callers
//! stay synchronous (and must not call it from inside another runtime).

use aws_sdk_dynamodb::config::http::HttpResponse;
use aws_sdk_dynamodb::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_dynamodb::types::{
    AttributeDefinition, AttributeValue, BillingMode, KeySchemaElement, KeyType, PutRequest, ScalarAttributeType,
    TableStatus, TimeToLiveSpecification, WriteRequest,
};
use aws_smithy_http_client::tls;
use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

/// The partition key of every item.
pub const PK: &str = "pk";
/// The sort key of every item.
pub const SK: &str = "sk";
/// The TTL attribute: epoch seconds after which DynamoDB deletes the item.
pub const TTL: &str = "expires_at";
/// BatchWriteItem's limit.
pub const BATCH: usize = 25;

/// An attribute value, as the catalog uses them: strings and numbers
/// (numbers kept as DynamoDB's decimal text).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Value {
    S(String),
    N(String),
}

impl Value {
    pub fn s(text: impl Into<String>) -> Value {
        Value::S(text.into())
    }

    pub fn n(number: impl std::fmt::Display) -> Value {
        Value::N(number.to_string())
    }

    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::S(s) => Some(s),
            Value::N(_) => None,
        }
    }

    pub fn as_u64(&self) -> Option<u64> {
        match self {
            Value::N(n) => n.parse().ok(),
            Value::S(_) => None,
        }
    }
}

/// One item: attribute name to value.
pub type Item = BTreeMap<String, Value>;

/// A conditional update of one item.
#[derive(Debug, Clone, PartialEq)]
pub struct Update {
    pub pk: String,
    pub sk: String,
    pub set: Item,
    pub remove: Vec<String>,
    /// Applies only if this numeric attribute is absent or not above the
    /// value: the newest news wins whichever node ships first.
    pub if_not_newer: Option<(String, u64)>,
}

/// Why a call failed, sorted by what the caller does about it.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// No credentials, or DynamoDB refused them: retrying will not help
    /// until an operator acts.
    #[error("no usable AWS credentials (missing, or refused by DynamoDB): {0}")]
    Credentials(String),
    /// DynamoDB asks us to slow down.
    #[error("DynamoDB throttled the request: {0}")]
    Throttled(String),
    /// No answer (down, unreachable, timed out, or a server error).
    #[error("DynamoDB unreachable: {0}")]
    Unreachable(String),
    /// The table does not exist (`archctl fleet create-table` makes it).
    #[error("no such table: {0}")]
    NoTable(String),
    #[error("{0}")]
    Other(String),
}

impl Error {
    /// A short name for metrics labels and logs.
    pub fn reason(&self) -> &'static str {
        match self {
            Error::Credentials(_) => "credentials",
            Error::Throttled(_) => "throttled",
            Error::Unreachable(_) => "unreachable",
            Error::NoTable(_) => "no_table",
            Error::Other(_) => "other",
        }
    }
}

/// What the catalog needs of its table.
pub trait Table {
    /// Puts up to [`BATCH`] items in one request; returns those DynamoDB
    /// left unprocessed (to be sent again).
    fn put_batch(&self, items: Vec<Item>) -> Result<Vec<Item>, Error>;
    /// Applies `update`; `false` if its condition did not hold.
    fn update(&self, update: &Update) -> Result<bool, Error>;
    /// One item, read consistently.
    fn get(&self, pk: &str, sk: &str) -> Result<Option<Item>, Error>;
    /// The items of one partition in sort-key order (descending if
    /// `descending`), at most `limit`.
    fn query(&self, pk: &str, descending: bool, limit: usize) -> Result<Vec<Item>, Error>;
}

/// Where the table is.
#[derive(Debug, Clone, Default)]
pub struct Settings {
    pub table: String,
    /// Unset: the SDK's own chain (`AWS_REGION`, the profile, instance metadata).
    pub region: Option<String>,
    /// Another endpoint than AWS's (tests, DynamoDB Local).
    pub endpoint: Option<String>,
}

/// The table in DynamoDB, with credentials from the standard chain
/// (environment, web identity, ECS task role, instance role, profile).
pub struct Dynamo {
    client: aws_sdk_dynamodb::Client,
    table: String,
    runtime: tokio::runtime::Runtime,
}

impl Dynamo {
    /// Resolves the configuration (no request is sent yet).
    pub fn connect(settings: &Settings) -> Result<Dynamo, Error> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| Error::Other(format!("async runtime: {e}")))?;
        let timeouts = aws_config::timeout::TimeoutConfig::builder()
            .connect_timeout(Duration::from_secs(3))
            .operation_attempt_timeout(Duration::from_secs(10))
            .operation_timeout(Duration::from_secs(30))
            .build();
        let https = aws_smithy_http_client::Builder::new()
            .tls_provider(tls::Provider::Rustls(tls::rustls_provider::CryptoMode::Ring))
            .build_https();
        let mut loader =
            aws_config::defaults(aws_config::BehaviorVersion::latest()).timeout_config(timeouts).http_client(https);
        if let Some(region) = &settings.region {
            loader = loader.region(aws_config::Region::new(region.clone()));
        }
        if let Some(endpoint) = &settings.endpoint {
            loader = loader.endpoint_url(endpoint);
        }
        let shared = runtime.block_on(loader.load());
        if shared.region().is_none() {
            return Err(Error::Other("no AWS region: set fleet_region in the host config, or AWS_REGION".into()));
        }
        let client = aws_sdk_dynamodb::Client::new(&shared);
        Ok(Dynamo { client, table: settings.table.clone(), runtime })
    }

    /// Creates the table (on-demand capacity, `pk`/`sk` keys) and turns its
    /// TTL on; `false` if it existed already (its TTL is turned on anyway).
    pub fn create_table(&self) -> Result<bool, Error> {
        let string = |name: &str| {
            AttributeDefinition::builder()
                .attribute_name(name)
                .attribute_type(ScalarAttributeType::S)
                .build()
                .map_err(|e| Error::Other(e.to_string()))
        };
        let key = |name: &str, kind| {
            KeySchemaElement::builder()
                .attribute_name(name)
                .key_type(kind)
                .build()
                .map_err(|e| Error::Other(e.to_string()))
        };
        let request = self
            .client
            .create_table()
            .table_name(&self.table)
            .attribute_definitions(string(PK)?)
            .attribute_definitions(string(SK)?)
            .key_schema(key(PK, KeyType::Hash)?)
            .key_schema(key(SK, KeyType::Range)?)
            .billing_mode(BillingMode::PayPerRequest);
        let created = match self.runtime.block_on(request.send()) {
            Ok(_) => true,
            Err(e) if e.as_service_error().is_some_and(|s| s.is_resource_in_use_exception()) => false,
            Err(e) => return Err(classify(e)),
        };
        self.wait_active()?;
        let ttl = TimeToLiveSpecification::builder()
            .enabled(true)
            .attribute_name(TTL)
            .build()
            .map_err(|e| Error::Other(e.to_string()))?;
        let request = self.client.update_time_to_live().table_name(&self.table).time_to_live_specification(ttl);
        match self.runtime.block_on(request.send()) {
            Ok(_) => {}
            // Already on: DynamoDB refuses to set it again.
            Err(e) if e.code() == Some("ValidationException") && !created => {}
            Err(e) => return Err(classify(e)),
        }
        Ok(created)
    }

    fn wait_active(&self) -> Result<(), Error> {
        for _ in 0..120 {
            let described = self.runtime.block_on(self.client.describe_table().table_name(&self.table).send());
            let status = described.map_err(classify)?.table.and_then(|t| t.table_status);
            if status == Some(TableStatus::Active) {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(500));
        }
        Err(Error::Other(format!("table {} not active after 60 s", self.table)))
    }
}

impl Table for Dynamo {
    fn put_batch(&self, items: Vec<Item>) -> Result<Vec<Item>, Error> {
        if items.is_empty() {
            return Ok(Vec::new());
        }
        let mut writes = Vec::with_capacity(items.len());
        for item in items {
            let put =
                PutRequest::builder().set_item(Some(to_sdk(&item))).build().map_err(|e| Error::Other(e.to_string()))?;
            writes.push(WriteRequest::builder().put_request(put).build());
        }
        let request = self.client.batch_write_item().request_items(&self.table, writes);
        let answer = self.runtime.block_on(request.send()).map_err(classify)?;
        let left = answer.unprocessed_items.unwrap_or_default().remove(&self.table).unwrap_or_default();
        Ok(left.into_iter().filter_map(|w| w.put_request).map(|p| from_sdk(&p.item)).collect())
    }

    fn update(&self, update: &Update) -> Result<bool, Error> {
        let mut names = HashMap::new();
        let mut values = HashMap::new();
        let mut sets = Vec::new();
        for (i, (name, value)) in update.set.iter().enumerate() {
            names.insert(format!("#s{i}"), name.clone());
            values.insert(format!(":s{i}"), to_attr(value));
            sets.push(format!("#s{i} = :s{i}"));
        }
        let mut removes = Vec::new();
        for (i, name) in update.remove.iter().enumerate() {
            names.insert(format!("#r{i}"), name.clone());
            removes.push(format!("#r{i}"));
        }
        let mut expression = String::new();
        if !sets.is_empty() {
            expression = format!("SET {}", sets.join(", "));
        }
        if !removes.is_empty() {
            expression = format!("{expression} REMOVE {}", removes.join(", "));
        }
        let mut request = self
            .client
            .update_item()
            .table_name(&self.table)
            .key(PK, AttributeValue::S(update.pk.clone()))
            .key(SK, AttributeValue::S(update.sk.clone()))
            .update_expression(expression);
        if let Some((name, value)) = &update.if_not_newer {
            names.insert("#c".into(), name.clone());
            values.insert(":c".into(), AttributeValue::N(value.to_string()));
            request = request.condition_expression("attribute_not_exists(#c) OR #c <= :c");
        }
        let request = request
            .set_expression_attribute_names(Some(names))
            .set_expression_attribute_values((!values.is_empty()).then_some(values));
        match self.runtime.block_on(request.send()) {
            Ok(_) => Ok(true),
            Err(e) if e.as_service_error().is_some_and(|s| s.is_conditional_check_failed_exception()) => Ok(false),
            Err(e) => Err(classify(e)),
        }
    }

    fn get(&self, pk: &str, sk: &str) -> Result<Option<Item>, Error> {
        let request = self
            .client
            .get_item()
            .table_name(&self.table)
            .key(PK, AttributeValue::S(pk.into()))
            .key(SK, AttributeValue::S(sk.into()))
            .consistent_read(true);
        let answer = self.runtime.block_on(request.send()).map_err(classify)?;
        Ok(answer.item.map(|item| from_sdk(&item)))
    }

    fn query(&self, pk: &str, descending: bool, limit: usize) -> Result<Vec<Item>, Error> {
        let mut items = Vec::new();
        let mut start = None;
        while items.len() < limit {
            let page = (limit - items.len()).min(1000) as i32;
            let request = self
                .client
                .query()
                .table_name(&self.table)
                .key_condition_expression("#pk = :pk")
                .expression_attribute_names("#pk", PK)
                .expression_attribute_values(":pk", AttributeValue::S(pk.into()))
                .scan_index_forward(!descending)
                .limit(page)
                .set_exclusive_start_key(start.take());
            let answer = self.runtime.block_on(request.send()).map_err(classify)?;
            items.extend(answer.items.unwrap_or_default().iter().map(from_sdk));
            match answer.last_evaluated_key {
                Some(key) if !key.is_empty() => start = Some(key),
                _ => break,
            }
        }
        Ok(items)
    }
}

fn to_attr(value: &Value) -> AttributeValue {
    match value {
        Value::S(s) => AttributeValue::S(s.clone()),
        Value::N(n) => AttributeValue::N(n.clone()),
    }
}

fn to_sdk(item: &Item) -> HashMap<String, AttributeValue> {
    item.iter().map(|(k, v)| (k.clone(), to_attr(v))).collect()
}

/// Attributes of other types (none the catalog writes) are left out.
fn from_sdk(item: &HashMap<String, AttributeValue>) -> Item {
    item.iter()
        .filter_map(|(k, v)| match v {
            AttributeValue::S(s) => Some((k.clone(), Value::S(s.clone()))),
            AttributeValue::N(n) => Some((k.clone(), Value::N(n.clone()))),
            _ => None,
        })
        .collect()
}

/// Sorts an SDK failure by what the caller can do about it, with its whole
/// chain of causes on one line.
fn classify<E>(e: SdkError<E, HttpResponse>) -> Error
where
    E: ProvideErrorMetadata + std::error::Error + 'static,
{
    let text = one_line(&e);
    let code = e.code().map(str::to_owned);
    let credentials = text.to_ascii_lowercase().contains("credential");
    match (&e, code.as_deref()) {
        (SdkError::ServiceError(_), Some(code)) => match code {
            "ProvisionedThroughputExceededException" | "ThrottlingException" | "RequestLimitExceeded" => {
                Error::Throttled(text)
            }
            "UnrecognizedClientException"
            | "InvalidSignatureException"
            | "AccessDeniedException"
            | "ExpiredTokenException"
            | "MissingAuthenticationTokenException"
            | "IncompleteSignatureException"
            | "InvalidClientTokenId" => Error::Credentials(text),
            "ResourceNotFoundException" => Error::NoTable(text),
            "InternalServerError" | "ServiceUnavailable" => Error::Unreachable(text),
            _ => Error::Other(text),
        },
        _ if credentials => Error::Credentials(text),
        (SdkError::DispatchFailure(_) | SdkError::TimeoutError(_) | SdkError::ResponseError(_), _) => {
            Error::Unreachable(text)
        }
        (SdkError::ServiceError(s), None) if s.raw().status().is_server_error() => Error::Unreachable(text),
        _ => Error::Other(text),
    }
}

/// An error and its causes on one line (`a: b: c`), each said once: the
/// SDK's own context dump is long and spans lines.
fn one_line(e: &(dyn std::error::Error + 'static)) -> String {
    let mut parts: Vec<String> = Vec::new();
    let mut next = Some(e);
    while let Some(err) = next {
        let text = err.to_string().split_whitespace().collect::<Vec<_>>().join(" ");
        if !text.is_empty() && !parts.iter().any(|p| p.contains(&text)) {
            parts.push(text);
        }
        next = err.source();
    }
    parts.join(": ")
}
