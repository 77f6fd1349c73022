#!/usr/bin/env python3
"""A device that streams its answers (protocol v1.1) with nothing but
paho-mqtt and MQTT 3.1.1: the example of docs/protocol.md section 11,
runnable, and run by tests/compat.rs.

It sets its last will to a cancel for its own session (a device that drops
off the network stops its own generation), asks with "stream": true,
prints the deltas as they come, and checks the final reply against them.
With --cancel-after N it cancels its request after N deltas.

Output: the answer as it streams, then one line "final: <json>". Exit
status 0 when the deltas were gap-free and the final reply has done=true,
seq = deltas received and (unless cancelled) text = the deltas joined.
"""

import argparse
import json
import queue
import sys
import uuid

import paho.mqtt.client as mqtt


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=1883)
    ap.add_argument("--project", default="general")
    ap.add_argument("--session", default="robot-1")
    ap.add_argument("--message", default="Tell me about the maze.")
    ap.add_argument("--max-tokens", type=int, default=0)
    ap.add_argument("--by-sentence", action="store_true")
    ap.add_argument("--cancel-after", type=int, default=0)
    ap.add_argument("--timeout", type=float, default=20.0)
    a = ap.parse_args()

    # --- the example starts here -------------------------------------------
    request_id = uuid.uuid4().hex[:16]
    reply_topic = f"{a.project}/assistant_response/{a.session}/{request_id}"
    messages = queue.Queue()

    if hasattr(mqtt, "CallbackAPIVersion"):  # paho-mqtt 2.x
        client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION1, client_id="dev-" + request_id)
    else:
        client = mqtt.Client(client_id="dev-" + request_id)
    # If this device drops off the network, the broker publishes this
    # cancel for it: the daemon stops the generation.
    client.will_set(f"{a.project}/cancel", json.dumps({"sessionId": a.session}), qos=1)
    client.on_connect = lambda c, u, f, rc: c.subscribe(reply_topic, qos=0)
    client.on_subscribe = lambda c, u, mid, q: messages.put(None)
    client.on_message = lambda c, u, m: messages.put(json.loads(m.payload))
    client.connect(a.host, a.port)
    client.loop_start()
    messages.get(timeout=a.timeout)  # subscribed

    request = {"sessionId": a.session, "requestId": request_id, "replyTopic": reply_topic,
               "message": a.message, "stream": True}
    if a.by_sentence:
        request["streamBy"] = "sentence"
    if a.max_tokens:
        request["maxTokens"] = a.max_tokens
    client.publish(f"{a.project}/user_input", json.dumps(request), qos=1)

    deltas = []
    while True:
        m = messages.get(timeout=a.timeout)
        if m.get("done"):  # the final reply: ok or not, with the whole text
            final = m
            break
        deltas.append(m)
        print(m["delta"], end="", flush=True)
        if a.cancel_after and len(deltas) == a.cancel_after:
            client.publish(f"{a.project}/cancel",
                           json.dumps({"sessionId": a.session, "requestId": request_id}), qos=1)
    print()
    # --- the example ends here ---------------------------------------------

    client.disconnect()  # a clean disconnect: the will is not sent
    client.loop_stop()
    print("final: " + json.dumps(final, sort_keys=True))
    problems = []
    if [d["seq"] for d in deltas] != list(range(len(deltas))):
        problems.append(f"seq {[d['seq'] for d in deltas]}")
    if final.get("seq") != len(deltas):
        problems.append(f"final seq {final.get('seq')} for {len(deltas)} deltas")
    if final.get("text", "") != "".join(d["delta"] for d in deltas):
        problems.append("the deltas do not add up to the final text")
    if problems:
        print("; ".join(problems), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
