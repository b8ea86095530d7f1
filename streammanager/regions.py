"""Cloud regions and the distances between them, for nearest-region fallback.

Coordinates are the approximate location of each AWS and GCE region's metro area (public knowledge);
they only need to be good enough to rank regions by distance.
"""
from __future__ import annotations

import math

# region code -> (latitude, longitude)
REGION_COORDINATES: dict[str, tuple[float, float]] = {
    # AWS
    "us-east-1": (38.9, -77.4),  # N. Virginia
    "us-east-2": (40.0, -83.0),  # Ohio
    "us-west-1": (37.4, -121.9),  # N. California
    "us-west-2": (45.9, -119.7),  # Oregon
    "ca-central-1": (45.5, -73.6),  # Montreal
    "ca-west-1": (51.0, -114.1),  # Calgary
    "mx-central-1": (20.6, -100.4),  # Queretaro
    "sa-east-1": (-23.5, -46.6),  # Sao Paulo
    "eu-west-1": (53.3, -6.3),  # Ireland
    "eu-west-2": (51.5, -0.1),  # London
    "eu-west-3": (48.9, 2.4),  # Paris
    "eu-central-1": (50.1, 8.7),  # Frankfurt
    "eu-central-2": (47.4, 8.5),  # Zurich
    "eu-north-1": (59.3, 18.1),  # Stockholm
    "eu-south-1": (45.5, 9.2),  # Milan
    "eu-south-2": (41.6, -0.9),  # Spain
    "il-central-1": (32.1, 34.8),  # Tel Aviv
    "me-south-1": (26.1, 50.6),  # Bahrain
    "me-central-1": (25.2, 55.3),  # UAE
    "af-south-1": (-33.9, 18.4),  # Cape Town
    "ap-east-1": (22.3, 114.2),  # Hong Kong
    "ap-south-1": (19.1, 72.9),  # Mumbai
    "ap-south-2": (17.4, 78.5),  # Hyderabad
    "ap-northeast-1": (35.7, 139.7),  # Tokyo
    "ap-northeast-2": (37.6, 127.0),  # Seoul
    "ap-northeast-3": (34.7, 135.5),  # Osaka
    "ap-southeast-1": (1.3, 103.8),  # Singapore
    "ap-southeast-2": (-33.9, 151.2),  # Sydney
    "ap-southeast-3": (-6.2, 106.8),  # Jakarta
    "ap-southeast-4": (-37.8, 145.0),  # Melbourne
    "ap-southeast-5": (3.1, 101.7),  # Malaysia
    # GCE
    "us-central1": (41.3, -95.9),  # Iowa
    "us-east1": (33.2, -80.0),  # South Carolina
    "us-east4": (39.0, -77.5),  # N. Virginia
    "us-east5": (40.0, -83.0),  # Columbus
    "us-south1": (32.8, -96.8),  # Dallas
    "us-west1": (45.6, -121.2),  # Oregon
    "us-west2": (34.1, -118.2),  # Los Angeles
    "us-west3": (40.8, -111.9),  # Salt Lake City
    "us-west4": (36.2, -115.1),  # Las Vegas
    "northamerica-northeast1": (45.5, -73.6),  # Montreal
    "northamerica-northeast2": (43.7, -79.4),  # Toronto
    "northamerica-south1": (20.6, -100.4),  # Queretaro
    "southamerica-east1": (-23.5, -46.6),  # Sao Paulo
    "southamerica-west1": (-33.4, -70.6),  # Santiago
    "europe-west1": (50.4, 3.8),  # Belgium
    "europe-west2": (51.5, -0.1),  # London
    "europe-west3": (50.1, 8.7),  # Frankfurt
    "europe-west4": (53.4, 6.8),  # Netherlands
    "europe-west6": (47.4, 8.5),  # Zurich
    "europe-west8": (45.5, 9.2),  # Milan
    "europe-west9": (48.9, 2.4),  # Paris
    "europe-west10": (52.5, 13.4),  # Berlin
    "europe-west12": (45.1, 7.7),  # Turin
    "europe-north1": (60.6, 27.2),  # Finland
    "europe-central2": (52.2, 21.0),  # Warsaw
    "europe-southwest1": (40.4, -3.7),  # Madrid
    "me-west1": (32.1, 34.8),  # Tel Aviv
    "me-central1": (25.3, 51.5),  # Doha
    "me-central2": (26.4, 50.1),  # Dammam
    "africa-south1": (-26.2, 28.0),  # Johannesburg
    "asia-east1": (24.1, 120.5),  # Taiwan
    "asia-east2": (22.3, 114.2),  # Hong Kong
    "asia-northeast1": (35.7, 139.7),  # Tokyo
    "asia-northeast2": (34.7, 135.5),  # Osaka
    "asia-northeast3": (37.6, 127.0),  # Seoul
    "asia-south1": (19.1, 72.9),  # Mumbai
    "asia-south2": (28.6, 77.2),  # Delhi
    "asia-southeast1": (1.3, 103.8),  # Singapore
    "asia-southeast2": (-6.2, 106.8),  # Jakarta
    "australia-southeast1": (-33.9, 151.2),  # Sydney
    "australia-southeast2": (-37.8, 145.0),  # Melbourne
}

_EARTH_RADIUS_KM = 6371.0
UNKNOWN_DISTANCE_KM = 1.0e6  # further than any two places on Earth


def is_known(region: str) -> bool:
    return region in REGION_COORDINATES


def distance_km(a: str, b: str) -> float:
    """Great-circle distance between two regions; 0 for the same region, UNKNOWN_DISTANCE_KM when
    either region has no coordinates."""
    if a == b:
        return 0.0
    pa, pb = REGION_COORDINATES.get(a), REGION_COORDINATES.get(b)
    if pa is None or pb is None:
        return UNKNOWN_DISTANCE_KM
    lat1, lon1, lat2, lon2 = map(math.radians, (*pa, *pb))
    h = math.sin((lat2 - lat1) / 2) ** 2 + math.cos(lat1) * math.cos(lat2) * math.sin((lon2 - lon1) / 2) ** 2
    return 2 * _EARTH_RADIUS_KM * math.asin(min(1.0, math.sqrt(h)))
