# syntax=docker/dockerfile:1
# The seed's chat: cat behind scalesocket.py, the page served on the same port.
# Alpine's own Python from apk, no pip: scalesocket.py needs nothing else.
FROM alpine:3.20
RUN apk add --no-cache python3
COPY scalesocket.py /usr/local/bin/scalesocket.py
COPY index.html /var/www/public/index.html
EXPOSE 9000
CMD ["python3", "/usr/local/bin/scalesocket.py", "--json", "--staticdir", "/var/www/public/", "cat"]
