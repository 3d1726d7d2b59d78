"""zar: run and compare image-classifier architecture studies on MLflow."""
