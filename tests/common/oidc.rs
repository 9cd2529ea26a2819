//! An OIDC test issuer: discovery, a JWKS and a client-credentials token endpoint, with keys
//! generated here (RSA, P-256, Ed25519) and a spare RSA key to rotate in.

use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use axum::Router;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use base64::Engine as _;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{Value, json};

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

pub struct Key {
    pub kid: String,
    pub alg: Algorithm,
    encoding: EncodingKey,
    pub jwk: Value,
}

fn rsa_key(kid: &str) -> Key {
    use rsa::pkcs1::EncodeRsaPrivateKey;
    use rsa::traits::PublicKeyParts;
    let private = rsa::RsaPrivateKey::new(&mut rand_core06::OsRng, 2048).unwrap();
    let der = private.to_pkcs1_der().unwrap();
    let public = private.to_public_key();
    Key {
        kid: kid.into(),
        alg: Algorithm::RS256,
        encoding: EncodingKey::from_rsa_der(der.as_bytes()),
        jwk: json!({"kty": "RSA", "kid": kid, "use": "sig", "alg": "RS256",
                    "n": b64(&public.n().to_bytes_be()), "e": b64(&public.e().to_bytes_be())}),
    }
}

fn ec_key(kid: &str) -> Key {
    use p256::pkcs8::EncodePrivateKey;
    let secret = p256::SecretKey::random(&mut rand_core06::OsRng);
    let der = secret.to_pkcs8_der().unwrap();
    let point =
        p256::elliptic_curve::sec1::ToEncodedPoint::to_encoded_point(&secret.public_key(), false);
    Key {
        kid: kid.into(),
        alg: Algorithm::ES256,
        encoding: EncodingKey::from_ec_der(der.as_bytes()),
        jwk: json!({"kty": "EC", "kid": kid, "use": "sig", "alg": "ES256", "crv": "P-256",
                    "x": b64(point.x().unwrap()), "y": b64(point.y().unwrap())}),
    }
}

fn ed_key(kid: &str) -> Key {
    use ed25519_dalek::pkcs8::EncodePrivateKey;
    let signing = ed25519_dalek::SigningKey::generate(&mut rand_core06::OsRng);
    let der = signing.to_pkcs8_der().unwrap();
    Key {
        kid: kid.into(),
        alg: Algorithm::EdDSA,
        encoding: EncodingKey::from_ed_der(der.as_bytes()),
        jwk: json!({"kty": "OKP", "kid": kid, "use": "sig", "alg": "EdDSA", "crv": "Ed25519",
                    "x": b64(signing.verifying_key().as_bytes())}),
    }
}

struct IssuerState {
    issuer: String,
    published: Vec<Value>,
    jwks_fetches: u64,
    token_requests: u64,
    /// client id → secret for the client-credentials flow.
    client: Option<(String, String)>,
    /// Access tokens handed out, newest last.
    issued: Vec<String>,
    token_lifetime: u64,
    /// The token endpoint accepts only client_secret_post; `announce` says so in discovery.
    post_only: Option<bool>,
}

#[derive(Clone)]
pub struct Issuer {
    pub url: String,
    state: Arc<Mutex<IssuerState>>,
    keys: Arc<Vec<Key>>,
}

pub fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

impl Issuer {
    /// Starts an issuer publishing `rsa-1`, `ec-1` and `ed-1`; `rsa-2` exists but is unpublished.
    pub async fn start() -> Issuer {
        let keys = vec![
            rsa_key("rsa-1"),
            ec_key("ec-1"),
            ed_key("ed-1"),
            rsa_key("rsa-2"),
        ];
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let state = Arc::new(Mutex::new(IssuerState {
            issuer: url.clone(),
            published: keys[..3].iter().map(|k| k.jwk.clone()).collect(),
            jwks_fetches: 0,
            token_requests: 0,
            client: None,
            issued: Vec::new(),
            token_lifetime: 300,
            post_only: None,
        }));
        let app = Router::new()
            .route("/.well-known/openid-configuration", get(discovery))
            .route("/jwks", get(jwks))
            .route("/token", post(token))
            .with_state(state.clone());
        tokio::spawn(async move { axum::serve(listener, app).await });
        Issuer {
            url,
            state,
            keys: Arc::new(keys),
        }
    }

    pub fn key(&self, kid: &str) -> &Key {
        self.keys.iter().find(|k| k.kid == kid).expect("known kid")
    }

    /// Publishes `kid` (a rotation: the new key joins the JWKS).
    pub fn publish(&self, kid: &str) {
        let jwk = self.key(kid).jwk.clone();
        self.state.lock().unwrap().published.push(jwk);
    }

    pub fn jwks_fetches(&self) -> u64 {
        self.state.lock().unwrap().jwks_fetches
    }

    pub fn allow_client(&self, id: &str, secret: &str) {
        self.state.lock().unwrap().client = Some((id.into(), secret.into()));
    }

    /// Makes the token endpoint accept client_secret_post only; `announce` lists just that
    /// method in discovery (otherwise discovery says nothing and the client must find out).
    pub fn post_only(&self, announce: bool) {
        self.state.lock().unwrap().post_only = Some(announce);
    }

    pub fn token_requests(&self) -> u64 {
        self.state.lock().unwrap().token_requests
    }

    pub fn last_issued(&self) -> Option<String> {
        self.state.lock().unwrap().issued.last().cloned()
    }

    /// Standard claims for `user`, valid for an hour.
    pub fn claims(&self, user: &str) -> Value {
        json!({"iss": self.url, "sub": user, "aud": "foldercast", "exp": now() + 3600,
               "nbf": now() - 10, "iat": now() - 10, "preferred_username": format!("{user}-name")})
    }

    /// A token signed with `kid`.
    pub fn sign(&self, kid: &str, claims: &Value) -> String {
        let key = self.key(kid);
        let mut header = Header::new(key.alg);
        header.kid = Some(kid.into());
        jsonwebtoken::encode(&header, claims, &key.encoding).unwrap()
    }

    pub fn token(&self, user: &str) -> String {
        self.sign("rsa-1", &self.claims(user))
    }
}

async fn discovery(State(state): State<Arc<Mutex<IssuerState>>>) -> Response {
    let (issuer, post_only) = {
        let s = state.lock().unwrap();
        (s.issuer.clone(), s.post_only)
    };
    let methods = match post_only {
        Some(true) => json!(["client_secret_post"]),
        Some(false) => Value::Null,
        None => json!(["client_secret_basic"]),
    };
    let mut doc = json!({
        "issuer": issuer,
        "jwks_uri": format!("{issuer}/jwks"),
        "token_endpoint": format!("{issuer}/token"),
        "authorization_endpoint": format!("{issuer}/authorize"),
        "id_token_signing_alg_values_supported": ["RS256", "ES256", "EdDSA"]
    });
    if !methods.is_null() {
        doc["token_endpoint_auth_methods_supported"] = methods;
    }
    axum::Json(doc).into_response()
}

async fn jwks(State(state): State<Arc<Mutex<IssuerState>>>) -> Response {
    let mut s = state.lock().unwrap();
    s.jwks_fetches += 1;
    // An encryption key and a symmetric key, which a verifier must skip.
    let mut keys = s.published.clone();
    keys.push(json!({"kty": "oct", "kid": "hmac", "k": b64(b"not-for-verifying")}));
    axum::Json(json!({"keys": keys})).into_response()
}

async fn token(
    State(state): State<Arc<Mutex<IssuerState>>>,
    headers: HeaderMap,
    body: String,
) -> Response {
    let mut s = state.lock().unwrap();
    s.token_requests += 1;
    let basic = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Basic "))
        .and_then(|b| base64::engine::general_purpose::STANDARD.decode(b).ok())
        .and_then(|b| String::from_utf8(b).ok());
    let expected = s
        .client
        .as_ref()
        .map(|(id, secret)| format!("{id}:{secret}"));
    let form: std::collections::HashMap<String, String> = form_urlencoded::parse(body.as_bytes())
        .into_owned()
        .collect();
    let posted = match (form.get("client_id"), form.get("client_secret")) {
        (Some(id), Some(secret)) => Some(format!("{id}:{secret}")),
        _ => None,
    };
    // One authentication method per request, the one this endpoint accepts.
    let authenticated = match s.post_only {
        Some(_) => basic.is_none() && posted.is_some() && posted == expected,
        None => posted.is_none() && basic.is_some() && basic == expected,
    };
    if !authenticated || form.get("grant_type").map(String::as_str) != Some("client_credentials") {
        return (
            StatusCode::UNAUTHORIZED,
            axum::Json(json!({"error": "invalid_client"})),
        )
            .into_response();
    }
    let access = format!("access-{}", s.token_requests);
    s.issued.push(access.clone());
    axum::Json(
        json!({"access_token": access, "token_type": "Bearer", "expires_in": s.token_lifetime}),
    )
    .into_response()
}
