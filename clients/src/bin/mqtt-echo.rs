//! `mqtt-echo`: the MQTT round-trip floor for benchmarks.
//!
//! Subscribes to `{project}/user_input` like the daemon and answers every
//! request at once with a JSON reply echoing the message, on the same reply
//! topic the daemon would use. Whatever vllm-mqttd adds to a request
//! (admission, queueing, workers, the HTTP call) is measured against this.
//!
//! The poll loop only polls and hands replies to a publisher task, as the
//! daemon's does.

use clap::Parser;
use rumqttc::v5::mqttbytes::v5::{Packet, PublishProperties};
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::{AsyncClient, Event, MqttOptions};
use serde_json::{json, Value};
use tokio::sync::mpsc;
use vllm_chat::protocol::{default_reply_topic, request_topic, validate_reply_topic};

/// Echo every request on `{project}/user_input` back as a JSON reply.
#[derive(Debug, Parser)]
#[command(name = "mqtt-echo", version)]
struct Args {
    #[arg(long, default_value = "127.0.0.1")]
    mqtt_host: String,
    #[arg(long, default_value_t = 1883)]
    mqtt_port: u16,
    /// Project to serve.
    #[arg(short, long, default_value = "general")]
    project: String,
}

struct Reply {
    topic: String,
    payload: Vec<u8>,
    correlation: Option<bytes::Bytes>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let mut o = MqttOptions::new(
        format!("mqtt-echo-{}", std::process::id()),
        &args.mqtt_host,
        args.mqtt_port,
    );
    o.set_max_packet_size(Some(1024 * 1024));
    let mut net = rumqttc::NetworkOptions::new();
    net.set_tcp_nodelay(true);
    o.set_network_options(net);
    let (client, mut eventloop) = AsyncClient::new(o, 4096);
    let (tx, mut rx) = mpsc::channel::<Reply>(65536);
    let publisher = client.clone();
    tokio::spawn(async move {
        while let Some(r) = rx.recv().await {
            let props = PublishProperties {
                correlation_data: r.correlation,
                ..Default::default()
            };
            if publisher
                .publish_with_properties(r.topic, QoS::AtMostOnce, false, r.payload, props)
                .await
                .is_err()
            {
                return;
            }
        }
    });
    let input = request_topic(&args.project);
    loop {
        match eventloop.poll().await {
            Ok(Event::Incoming(Packet::ConnAck(_))) => {
                client.try_subscribe(input.clone(), QoS::AtLeastOnce)?;
                eprintln!("mqtt-echo: serving {input}");
            }
            Ok(Event::Incoming(Packet::Publish(p))) => {
                let props = p.properties.unwrap_or_default();
                let v: Value = serde_json::from_slice(&p.payload).unwrap_or(Value::Null);
                let session = v["sessionId"].as_str().unwrap_or("default");
                let topic = props
                    .response_topic
                    .filter(|t| validate_reply_topic(&args.project, t).is_ok())
                    .or_else(|| {
                        v["replyTopic"]
                            .as_str()
                            .filter(|t| validate_reply_topic(&args.project, t).is_ok())
                            .map(str::to_owned)
                    })
                    .unwrap_or_else(|| default_reply_topic(&args.project, session));
                let text = v["message"].as_str().unwrap_or("");
                let payload = if v["format"] == "json" {
                    serde_json::to_vec(&json!({
                        "requestId": v["requestId"], "sessionId": session,
                        "ok": true, "text": text, "finishReason": "stop",
                    }))?
                } else {
                    text.as_bytes().to_vec()
                };
                // Never await in the poll loop: a full channel drops the reply.
                let _ = tx.try_send(Reply {
                    topic,
                    payload,
                    correlation: props.correlation_data,
                });
            }
            Ok(_) => {}
            Err(e) => {
                eprintln!("mqtt-echo: {e}; reconnecting");
                tokio::time::sleep(std::time::Duration::from_millis(200)).await;
            }
        }
    }
}
