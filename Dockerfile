FROM python:3.11-slim
WORKDIR /app
# gcc: models/lut.c and palette.c (palettized decoding, palette fitting) compile on first use for the
# CPU they run on (models/native.py); without a compiler the torch paths run instead.
RUN apt-get update && apt-get install -y --no-install-recommends gcc libc6-dev \
 && rm -rf /var/lib/apt/lists/*
ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 STATIC_ROOT=/app/static EVALHUB_MANIFEST_STATIC=true
COPY pyproject.toml requirements-data.txt README.md ./
COPY core core
COPY evalhub evalhub
COPY grading grading
COPY models models
COPY suites suites
COPY manage.py ./
RUN pip install . \
 && pip install --no-deps -r requirements-data.txt \
 && EVALHUB_VAR_DIR=/tmp/build SECRET_KEY=build python manage.py collectstatic --noinput
EXPOSE 8000
