# xrates: one image for every process. The command picks the role:
#   API (default)  python sanic_app.py --host 0.0.0.0 --port 8000 --workers 1
#   updater        python updater.py           (healthcheck: python updater.py --check)
#   migrate        python admin.py migrate      (one-shot, before API and updaters start)
# Set DATABASE_URL (and XRATES_AUTO_MIGRATE=0 when a migrate step runs); see docs/operations.md.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# A fixed numeric uid, so Kubernetes can verify runAsNonRoot.
RUN groupadd --system --gid 10001 xrates \
    && useradd --system --uid 10001 --gid 10001 --home-dir /app --no-create-home \
       --shell /usr/sbin/nologin xrates

WORKDIR /app

# Dependencies first (a layer that survives code changes); every version pinned.
COPY requirements.txt constraints.txt ./
RUN pip install -r requirements.txt -c constraints.txt

# The code stays owned by root: the app user can read it, not change it.
COPY . .

USER 10001:10001
EXPOSE 8000

# Liveness of the API (constant route, no I/O). Services that run another command override it
# (docker-compose.yml: updater uses `python updater.py --check`, migrate disables it).
HEALTHCHECK --interval=10s --timeout=3s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import sys, urllib.request; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=2).status == 200 else 1)"]

# Sanic drains in-flight requests and closes the listener on SIGTERM.
STOPSIGNAL SIGTERM
CMD ["python", "sanic_app.py", "--host", "0.0.0.0", "--port", "8000", "--workers", "1"]
