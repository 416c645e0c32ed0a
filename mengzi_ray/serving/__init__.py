"""Ray Serve application: HTTP ingress (api.py) composing Detector, Captioner and Retriever deployments
(deployments.py), a two-stage retrieval index (retrieval.py), settings for serve/config.yaml (settings.py) and the
builder `mengzi_ray.serving.app:build_app`. Importing this package starts nothing."""
