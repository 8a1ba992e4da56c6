"""A pending visit row and the default settings, for tests of the checks the pipeline
runs on a converted image."""


def pending_visit(**fields) -> dict:
    return {"participant_id": "P1", "visit": "1", "status": "pending", "status_reason": None,
            "qc_status": "pass", "qc_reasons": None, **fields}


def default_settings() -> dict:
    from cacflow.config import load_config

    return load_config()
