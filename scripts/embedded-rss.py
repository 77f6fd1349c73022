#!/usr/bin/env python3
"""Memory of the embedded broker under big publishes: starts vllm-mqttd with
--embedded-broker on a random loopback port, subscribes to a reply topic,
publishes 150 messages of 900 KB at QoS 1, and prints the RSS before and
after. Usage: python3 scripts/embedded-rss.py target/release/vllm-mqttd
(needs paho-mqtt, which scripts/test.sh installs)."""
import subprocess, time, random, sys, os
import paho.mqtt.client as mqtt
binp = sys.argv[1]
port = random.randint(20000, 40000)
d = subprocess.Popen([binp, "--embedded-broker", f"127.0.0.1:{port}", "--backend-url", "http://127.0.0.1:9/v1",
                      "--model", "m", "--instance-id", "rss"], stderr=subprocess.DEVNULL)
import socket
for _ in range(100):
    try:
        socket.create_connection(("127.0.0.1", port), 0.2).close(); break
    except OSError:
        time.sleep(0.1)
time.sleep(0.5)
def rss():
    for l in open(f"/proc/{d.pid}/status"):
        if l.startswith("VmRSS"): return int(l.split()[1])
before = rss()
sub = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="sub") if hasattr(mqtt, "CallbackAPIVersion") else mqtt.Client(client_id="sub")
sub.connect("127.0.0.1", port); sub.subscribe("general/assistant_response/#"); sub.loop_start()
pub = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="pub") if hasattr(mqtt, "CallbackAPIVersion") else mqtt.Client(client_id="pub")
pub.connect("127.0.0.1", port); pub.loop_start()
big = b"x" * 900_000
for i in range(150):
    pub.publish("general/assistant_response/x", big, qos=1).wait_for_publish()
time.sleep(2)
after = rss()
print(f"RSS before {before} kB, after 150 x 900 KB publishes {after} kB (+{(after-before)//1024} MB)")
d.terminate(); d.wait()
