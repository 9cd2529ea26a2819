//! The deployment files: docker-compose.yml against the Compose Specification's JSON Schema
//! (taken from Debian's docker-compose package by scripts/test.sh), and the shape the issue asks
//! for. No container engine runs here, so this is as far as a test can go.

mod common;

use serde_json::Value;

fn compose() -> Value {
    let text = std::fs::read_to_string(common::root().join("docker-compose.yml")).unwrap();
    let mut yaml: serde_yaml_ng::Value =
        serde_yaml_ng::from_str(&text).expect("docker-compose.yml is YAML");
    // Compose resolves `<<` merge keys (the x-foldercast anchors) before validating; so do we.
    yaml.apply_merge().expect("merge keys resolve");
    serde_json::to_value(yaml).expect("YAML to JSON")
}

#[test]
fn compose_file_matches_the_compose_specification() {
    let schema_path = common::server_env("FOLDERCAST_COMPOSE_SCHEMA");
    let schema: Value =
        serde_json::from_str(&std::fs::read_to_string(schema_path).unwrap()).unwrap();
    let validator = jsonschema::validator_for(&schema).expect("the compose schema compiles");
    let doc = compose();
    let errors: Vec<String> = validator
        .iter_errors(&doc)
        .map(|e| format!("{e} at {}", e.instance_path()))
        .collect();
    assert!(
        errors.is_empty(),
        "docker-compose.yml violates the Compose Specification: {errors:#?}"
    );
}

#[test]
fn compose_has_the_production_shape() {
    let doc = compose();
    let services = doc["services"].as_object().unwrap();
    assert!(
        services["kafka"]["environment"]["KAFKA_PROCESS_ROLES"]
            .as_str()
            .unwrap()
            .contains("controller"),
        "KRaft, no ZooKeeper"
    );
    for node in ["redis-1", "redis-2", "redis-3"] {
        let cmd: Vec<&str> = services[node]["command"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_str().unwrap())
            .collect();
        assert!(
            cmd.windows(2).any(|w| w == ["--cluster-enabled", "yes"]),
            "{node} is a cluster node"
        );
    }
    assert!(
        services["redis-cluster-init"]["command"][0]
            .as_str()
            .unwrap()
            .contains("--cluster create")
    );
    for (name, subcommand) in [("consume", "consume"), ("gateway", "gateway")] {
        assert_eq!(
            services[name]["deploy"]["replicas"], 2,
            "two {name} services"
        );
        assert_eq!(services[name]["command"][0], subcommand);
        assert!(
            services[name]["environment"]["FOLDERCAST_REDIS_CLUSTER"]
                .as_str()
                .unwrap()
                .split(',')
                .count()
                == 3
        );
    }
    assert!(
        services["lb"]["ports"][0]
            .as_str()
            .unwrap()
            .ends_with(":80"),
        "a load balancer in front"
    );
    let nginx = std::fs::read_to_string(common::root().join("deploy/nginx.conf")).unwrap();
    assert!(
        nginx.contains("proxy_set_header Upgrade") && nginx.contains("proxy_buffering off"),
        "WebSocket upgrade and unbuffered SSE"
    );
}

#[test]
fn dockerfile_is_multi_stage_and_runs_as_non_root() {
    let text = std::fs::read_to_string(common::root().join("Dockerfile")).unwrap();
    assert!(
        text.matches("\nFROM ").count() + usize::from(text.starts_with("FROM ")) >= 2,
        "multi-stage"
    );
    assert!(text.contains("-slim"), "small runtime image");
    let user = text
        .lines()
        .find(|l| l.starts_with("USER "))
        .expect("a USER line");
    assert!(
        !user.contains("root") && !user.contains(" 0"),
        "non-root: {user}"
    );
    assert!(text.contains("COPY --from=build"));
}
