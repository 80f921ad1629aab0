"""`kubespan relay`: forwards WireGuard messages between nodes that cannot reach each other.

Two nodes behind symmetric NATs have no direct path. Both register with a relay on a
public node and announce its address as one more endpoint; WireGuard on each side then
talks to the relay, which routes each message without decrypting it:

- registration (ours, sent from the node's WireGuard port): public key -> address;
- initiation: to the registered node whose mac1 key matches;
- response, cookie reply, data: by the receiver index learned from the handshakes
  it forwarded, and only from the address on the other side of that handshake.

`registration` is the message both ends share, `core` the sans-I/O routing,
`server` the UDP socket, metrics and command line.
"""
