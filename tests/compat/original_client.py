#!/usr/bin/env python3
"""An original vLLMDeploy.py client, as the robots and game clients in the
field were written: paho-mqtt, MQTT 3.1.1, QoS 0, a plain-text reply on a
per-request topic. vllm-mqttd must serve it unchanged.

Exit status 0 when every turn got a plain-text reply that starts with
--expect-prefix, 1 otherwise (with the reason on stderr).
"""

import argparse
import json
import queue
import sys
import uuid

import paho.mqtt.client as mqtt


def make_client(client_id):
    # paho-mqtt 2.x requires the callback API version; 1.x has no such arg.
    if hasattr(mqtt, "CallbackAPIVersion"):
        return mqtt.Client(mqtt.CallbackAPIVersion.VERSION1, client_id=client_id)
    return mqtt.Client(client_id=client_id)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=1883)
    ap.add_argument("--project", default="general")
    ap.add_argument("--session", default="robot-1")
    ap.add_argument("--turns", type=int, default=2)
    ap.add_argument("--expect-prefix", default="")
    ap.add_argument("--timeout", type=float, default=10.0)
    args = ap.parse_args()

    client_id = "orig-" + uuid.uuid4().hex[:8]
    replies = queue.Queue()
    subscribed = queue.Queue()

    client = make_client(client_id)
    client.on_message = lambda c, u, msg: replies.put((msg.topic, msg.payload))
    client.on_subscribe = lambda c, u, mid, granted: subscribed.put(mid)
    client.connect(args.host, args.port, keepalive=30)
    client.loop_start()
    try:
        for turn in range(args.turns):
            request_id = uuid.uuid4().hex[:12]
            reply_topic = "%s/assistant_response/%s/%s/%s" % (
                args.project, args.session, client_id, request_id)
            client.subscribe(reply_topic, qos=0)
            subscribed.get(timeout=args.timeout)
            message = "turn %d from the original client" % turn
            payload = json.dumps({
                "sessionId": args.session,
                "message": message,
                "replyTopic": reply_topic,
                "clientId": client_id,
                "requestId": request_id,
            })
            client.publish("%s/user_input" % args.project, payload, qos=0)
            try:
                topic, body = replies.get(timeout=args.timeout)
            except queue.Empty:
                print("no reply on %s within %ss" % (reply_topic, args.timeout), file=sys.stderr)
                return 1
            text = body.decode("utf-8")
            if topic != reply_topic:
                print("reply on %s, expected %s" % (topic, reply_topic), file=sys.stderr)
                return 1
            if text.lstrip().startswith("{"):
                print("expected a plain-text reply, got JSON: %s" % text, file=sys.stderr)
                return 1
            if not text.startswith(args.expect_prefix) or not text.strip():
                print("unexpected reply: %r" % text, file=sys.stderr)
                return 1
            print(text)
            client.unsubscribe(reply_topic)
        return 0
    finally:
        client.loop_stop()
        client.disconnect()


if __name__ == "__main__":
    sys.exit(main())
