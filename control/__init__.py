"""control: the KubeSpan control plane (config, identity, discovery, reconcile, routing)."""
